"""Default settings (YAML), shipped inside the package as ``magicanimate.configs``."""
