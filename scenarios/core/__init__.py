"""Plain values every role shares: exit codes and errors, layouts, Schedules, per-rank records, verdicts, release tables."""
