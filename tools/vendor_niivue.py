#!/usr/bin/env python3
"""Vendor NiiVue's browser build into the menseg package (run by a developer, not at install).

``menseg review`` must work with no internet, so the viewer it uses is a file of the package:
``src/menseg/review/static/vendor/niivue.umd.js`` (the UMD bundle of the pinned ``@niivue/niivue``
npm release, its dependencies inlined), with NiiVue's licence and those of the bundled packages
beside it and a ``niivue.json`` manifest (version, npm integrity, sha256 of the file). A test checks
the file against the manifest. To move to another release, change NIIVUE_VERSION and
NIIVUE_INTEGRITY (``npm view @niivue/niivue@VERSION dist.integrity``) and run
``python tools/vendor_niivue.py``; it needs ``npm`` and the npm registry.
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

NIIVUE_VERSION = "0.69.0"
NIIVUE_INTEGRITY = ("sha512-YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+"
                    "MhtO/edMbXJkA==")
BUNDLE = "dist/niivue.umd.js"
DEST = Path(__file__).resolve().parents[1] / "src" / "menseg" / "review" / "static" / "vendor"

# The npm tarball has no LICENSE file: this is the text of the LICENSE in NiiVue's repository.
NIIVUE_LICENSE = """BSD 2-Clause License

Copyright (c) 2021, Niivue
All rights reserved.

Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this
   list of conditions and the following disclaimer.

2. Redistributions in binary form must reproduce the above copyright notice,
   this list of conditions and the following disclaimer in the documentation
   and/or other materials provided with the distribution.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS"
AND ANY EXPRESS OR IMPLIED WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE
IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A PARTICULAR PURPOSE ARE
DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE
FOR ANY DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL
DAMAGES (INCLUDING, BUT NOT LIMITED TO, PROCUREMENT OF SUBSTITUTE GOODS OR
SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY,
OR TORT (INCLUDING NEGLIGENCE OR OTHERWISE) ARISING IN ANY WAY OUT OF THE USE
OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


def _pack(spec: str, where: Path) -> tuple[Path, str]:
    out = subprocess.run(["npm", "pack", spec, "--json"], cwd=where, check=True, capture_output=True,
                         text=True).stdout
    info = json.loads(out)[0]
    return where / info["filename"], info["integrity"]


def _licence_of(tgz: Path) -> str | None:
    with tarfile.open(tgz) as tar:
        for m in tar.getmembers():
            name = m.name.split("/", 1)[-1]
            if "/" not in name and name.lower().startswith(("license", "licence", "copying")):
                return tar.extractfile(m).read().decode()
    return None


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tgz, integrity = _pack(f"@niivue/niivue@{NIIVUE_VERSION}", tmp)
        digest = "sha512-" + base64.b64encode(hashlib.sha512(tgz.read_bytes()).digest()).decode()
        if integrity != NIIVUE_INTEGRITY or digest != NIIVUE_INTEGRITY:
            raise SystemExit(f"integrity mismatch: npm says {integrity}, file is {digest}, "
                             f"pinned {NIIVUE_INTEGRITY}")
        with tarfile.open(tgz) as tar:
            bundle = tar.extractfile(f"package/{BUNDLE}").read()
            pkg = json.loads(tar.extractfile("package/package.json").read())
        DEST.mkdir(parents=True, exist_ok=True)
        (DEST / "niivue.umd.js").write_bytes(bundle)
        notices = [f"NiiVue {NIIVUE_VERSION} (@niivue/niivue, {pkg['license']}):\n\n{NIIVUE_LICENSE}"]
        deps = {}
        for name, rng in sorted(pkg.get("dependencies", {}).items()):
            dep_tgz, _ = _pack(f"{name}@{rng}", tmp)
            text = _licence_of(dep_tgz)
            with tarfile.open(dep_tgz) as tar:
                dep_pkg = json.loads(tar.extractfile("package/package.json").read())
            deps[name] = {"range": rng, "license": dep_pkg.get("license")}
            text = text or f"(no licence file in the package; licence: {dep_pkg.get('license')})"
            notices.append(f"{name} ({dep_pkg.get('license')}), bundled in niivue.umd.js:\n\n{text}")
        (DEST / "LICENSE-niivue.txt").write_text(NIIVUE_LICENSE)
        (DEST / "THIRD_PARTY_NOTICES.txt").write_text(("\n" + "-" * 72 + "\n\n").join(notices))
        manifest = {"package": "@niivue/niivue", "version": NIIVUE_VERSION, "file": BUNDLE,
                    "npm_integrity": NIIVUE_INTEGRITY, "license": pkg["license"],
                    "sha256": hashlib.sha256(bundle).hexdigest(), "bundled_dependencies": deps}
        (DEST / "niivue.json").write_text(json.dumps(manifest, indent=2) + "\n")
        shutil.rmtree(tmp / "package", ignore_errors=True)
    print(f"vendored NiiVue {NIIVUE_VERSION} into {DEST}")  # noqa: T201


if __name__ == "__main__":
    main()
