"""The command line: the composition root of ``nnunet-node`` outside the app factory."""
