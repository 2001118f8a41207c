"""HTML reports a person reads: per participant and for the group."""
