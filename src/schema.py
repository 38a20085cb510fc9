"""The config schema: the template's keys plus yours.

Every key a config may hold must be declared, so that a typo is an error rather
than a silently ignored setting. The template's keys (epochs, optimizer,
checkpoint, ...) are in `src/core/template_schema.py`; add yours below as
cerberus rules (https://docs.python-cerberus.org/validation-rules.html).
A `default` fills a missing key; `meta: {"affects_results": False}` lets
`--resume` change the key.

The keyword arguments in `model_parameters` and `data_loader_parameters` are
checked against your classes' constructors, so they need no rules here.
"""

from src.core.template_schema import TEMPLATE_SCHEMA

USER_SCHEMA = {
    # For example, a key your own code reads as `config.noise_level`:
    # "noise_level": {"type": "float", "min": 0.0, "default": 0.0},
}

SCHEMA = {**TEMPLATE_SCHEMA, **USER_SCHEMA}
