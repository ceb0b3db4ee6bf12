"""What the harness writes: replay files, soak reports, plots, matrix cells, atomic writes."""
