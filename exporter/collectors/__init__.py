"""One module per family of metrics: each renders a snapshot into metric families."""
