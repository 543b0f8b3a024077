"""pipelines.yaml: its schema (what stages compute with), its loading and error wording, and the
settings derived from it."""
