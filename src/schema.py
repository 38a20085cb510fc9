"""Your config keys, added to the template's (`src/core/config/schema.py`).

Every key a config may hold must be declared, so that a typo is an error rather
than a silently ignored setting. Add yours below as cerberus rules
(https://docs.python-cerberus.org/validation-rules.html). A `default` fills a
missing key; `meta: {"affects_results": False}` lets `--resume` change the key.
A key the template already has is an error: choose another name.

The keyword arguments in `model_parameters` and `data_loader_parameters` are
checked against your classes' constructors, so they need no rules here.
"""

USER_SCHEMA = {
    # For example, a key your own code reads as `config.noise_level`:
    # "noise_level": {"type": "float", "min": 0.0, "default": 0.0},
}
