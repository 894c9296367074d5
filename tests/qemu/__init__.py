"""Helpers for the slow QEMU tests: initramfs builder, QMP client, boot driver."""
