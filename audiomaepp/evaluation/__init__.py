"""HEAR-style downstream evaluation: task folders (tasks), the vmapped probe (probe), metrics and
the normalised score (scores), and reports (report). See docs/evaluation.md."""
