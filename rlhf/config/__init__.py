"""Run configuration: the dataclasses with each field's help (`schema`), YAML loading and overrides
(`loader`), cross-field checks (`validate`) and the generated reference (`docs`)."""
