"""Implementation of tbptt; import the public names from `tbptt` instead."""
