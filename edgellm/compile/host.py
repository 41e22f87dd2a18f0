"""`compile --host TRIPLE`: the LLVM target triple MLC-LLM takes, mapped to an edgellm device.

  *-apple-ios*          iphone (ExecuTorch .pte, XNNPACK: the phone's CPU)
  *-linux-android*      android (likewise)
  wasm32-*              refused: there is no WebGPU/WebAssembly backend
  desktop triples       cpu, when the triple is this machine's own architecture and OS
                        (AOTInductor builds with the host's compiler for the host); another
                        desktop is refused with what is missing, since no cross toolchain is used
"""

from __future__ import annotations

import platform
import sys

from edgellm.errors import UserError

_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "x86-64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64",
         "arm64e": "aarch64"}


def _this_machine() -> tuple[str, str]:
    """(architecture, os) of the machine compiling, in the triples' spelling."""
    arch = _ARCH.get(platform.machine().lower(), platform.machine().lower())
    os_name = {"darwin": "darwin", "win32": "windows"}.get(sys.platform, "linux")
    return arch, os_name


def _triple_os(parts: list[str]) -> str | None:
    rest = "-".join(parts[1:])
    for key, name in (("darwin", "darwin"), ("macos", "darwin"), ("windows", "windows"), ("linux", "linux")):
        if key in rest:
            return name
    return None


def host_device(host: str, device: str | None) -> str:
    """The edgellm device that `--host` (with an optional `--device`) compiles for; UserError if none."""
    triple = host.strip().lower()
    parts = triple.split("-")
    arch = parts[0]
    explicit = device not in (None, "", "auto")
    if arch.startswith("wasm"):
        raise UserError(f"--host {host}: not supported: no WebGPU backend (edgellm builds no WebAssembly "
                        "libraries); use --host aarch64-linux-android or arm64-apple-ios for phones")
    if "ios" in parts or any(p.startswith("ios") for p in parts[1:]):
        want = "iphone"
    elif "android" in triple:
        want = "android"
    else:
        os_name = _triple_os(parts)
        if os_name is None or arch not in _ARCH:
            raise UserError(f"--host {host}: unknown target triple; examples: arm64-apple-ios, "
                            "aarch64-linux-android, x86_64-pc-windows-msvc, arm64-apple-darwin")
        me_arch, me_os = _this_machine()
        if (_ARCH[arch], os_name) != (me_arch, me_os):
            raise UserError(f"--host {host}: a cpu library for {_ARCH[arch]} {os_name} needs that machine's "
                            f"compiler (AOTInductor builds for the host it runs on, this is {me_arch} {me_os}, "
                            "and no cross toolchain is used); compile on that machine, or omit --host")
        want = "cpu"
        if explicit and device in ("cuda", "mps"):
            return device  # the host runs the library's CPU side; the device is the GPU
    if explicit and device != want:
        raise UserError(f"--host {host} targets {want}, but --device is {device}; drop one of them")
    return want
