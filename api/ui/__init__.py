"""The dashboard at ``/ui`` (see :mod:`nnunet_node.api.ui.pages`)."""
