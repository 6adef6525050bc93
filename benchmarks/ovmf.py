"""Where the OVMF benchmarks find Debian's firmware (the ``ovmf`` package)."""

from __future__ import annotations

from pathlib import Path

OVMF_DIR = Path("/usr/share/OVMF")
#: The 2 MiB X64 build: the one that can run as SEV-ES (OVMF_CODE_4M.fd is Ia32X64).
OVMF_CODE = OVMF_DIR / "OVMF_CODE.fd"
OVMF_VARS = OVMF_DIR / "OVMF_VARS.fd"


def missing(*paths: Path) -> str | None:
    """Why an OVMF line is skipped, or None when every file is there."""
    absent = [str(path) for path in paths if not path.is_file()]
    return f"{', '.join(absent)} missing: install Debian's ovmf package" if absent else None
