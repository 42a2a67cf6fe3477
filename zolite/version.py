"""zolite's version: written into every patch (zolite.version), so it lives apart from the package's imports."""
__version__ = "0.1.0"
