"""Weights on disk: converted checkpoints, training stage directories (Orbax), and the split of
a parameter tree into its trained and frozen parts."""
