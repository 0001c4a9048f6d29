"""Exporting mvm images to other runtimes (today: KubeVirt).

A leaf-ish package: it reads an image directory (``manifest.json``, kernel, initrd,
``rootfs.ext4``) and writes files; it imports only :mod:`mvm.errors`, :mod:`mvm._proc` and
:mod:`mvm._atomic`, never the orchestration layer, so ``mvm._api`` and the CLI can call it
without cycles.
"""
