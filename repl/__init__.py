"""The interactive kernel-context debugger: ``kctx-debug [SNAPSHOT]`` (see :mod:`.main`).

Submodules are imported on use: the CLI's offline verbs import only :mod:`.summary`.
"""

__all__: list[str] = []
