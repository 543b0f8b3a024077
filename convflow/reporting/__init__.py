"""Report pages: Jinja2 templates and the figures they embed."""
