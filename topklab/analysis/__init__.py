"""Analysis of tidy results: summaries and seaborn figures."""
