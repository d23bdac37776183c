"""Publishing: model cards (``modelcard``), the metrics schema (``results``) and push to the
Hub (``publish``)."""
