"""Adapters that run FAVOR+ inside other libraries' models.

Each adapter is a submodule that imports its library when it is itself imported, never before:
``import favor`` and ``import favor.integrations`` import no optional dependency.

* :mod:`favor.integrations.transformers`: Hugging Face ``transformers`` (>= 5.0) adapter:
  ``attn_implementation="favor"``, :func:`~favor.integrations.transformers.performerize`,
  :func:`~favor.integrations.transformers.unperformerize`.
"""
