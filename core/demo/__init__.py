"""The bundled demo snapshot (demo.json), built by fixtures/make_demo.py."""
