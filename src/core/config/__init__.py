"""The config pipeline, in this order (README, "Config"):

1. load the YAML file (`loader`: safe, bounded; `1e-3` is a float; a duplicate key is an error)
2. to 5. the command line's edits (`edits`): --find-replace, --delete, --modify, --a.b=VALUE
6. to 8. defaults, cerberus validation against the schema (`schema`), an immutable `Config` (`validation`)

Every mistake is a `UserError` naming the key, what was expected and what was
found, with the nearest real key for typos.
"""
