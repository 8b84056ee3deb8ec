"""Memory a device pays for its trust code: edgefleet's verifier (protocol.trust) vs python-tuf's metadata API,
each doing the same work (load a root, verify one signed document), against a bare interpreter in the same run.

    python bench/trust_memory.py [--rounds 5] [--tuf-python PATH]

``--tuf-python`` is an interpreter with ``tuf``, ``cryptography`` and ``msgspec`` installed, e.g. a scratch venv:
``python3 -m venv /tmp/tufvenv && /tmp/tufvenv/bin/pip install tuf cryptography msgspec``. python-tuf is not a
dependency of edgefleet; this bench is what docs/adr/0001-trust-format.md quotes. Medians of RSS after
the work, in MB, from /proc/self/status (each case in a fresh process).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RSS = "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')))"

BASELINE = "import json, hashlib\n" + RSS

# what both verifiers need anyway, and an edgefleet agent already loads: Ed25519 from cryptography
CRYPTO = """
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
k = Ed25519PrivateKey.generate()
k.public_key().verify(k.sign(b"x"), b"x")
""" + RSS

# what the agent daemon loads anyway (it verifies states and releases today): the verifier's marginal cost
AGENT_PROTOCOL = "import protocol.messages, protocol.signing, protocol.verify, protocol.topics\n" + RSS

EDGEFLEET = """
import time
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from protocol.messages import DesiredState
from protocol.signing import make_root, sign
from protocol.trust import TrustState
k = Ed25519PrivateKey.generate()
trust = TrustState(make_root({r: [k] for r in ("root", "release", "director")}, [k]))
state = DesiredState(device="d", revision=1, expires=int(time.time()) + 60)
assert trust.accept_desired(sign(state.to_dict(), [k]), "d", time.time()).revision == 1
""" + RSS

TUF = """
from datetime import datetime, timedelta, timezone
from securesystemslib.signer import CryptoSigner
from tuf.api.metadata import Metadata, Root, Targets
signer = CryptoSigner.generate_ed25519()
root = Metadata(Root(expires=datetime.now(timezone.utc) + timedelta(days=1)))
for role in ("root", "timestamp", "snapshot", "targets"):
    root.signed.add_key(signer.public_key, role)
root.sign(signer)
trusted = Metadata[Root].from_bytes(root.to_bytes())
trusted.verify_delegate("root", trusted)
targets = Metadata(Targets(expires=datetime.now(timezone.utc) + timedelta(days=1)))
targets.sign(signer)
trusted.verify_delegate("targets", Metadata.from_bytes(targets.to_bytes()))
""" + RSS


def rss_kb(python: str, code: str) -> int:
    out = subprocess.run([python, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tuf-python", default=None, help="interpreter with python-tuf installed")
    args = ap.parse_args()
    cases = {"bare": (sys.executable, BASELINE), "crypto": (sys.executable, CRYPTO),
             "agent's protocol imports": (sys.executable, AGENT_PROTOCOL),
             "edgefleet protocol.trust": (sys.executable, EDGEFLEET)}
    if args.tuf_python:
        cases |= {"tuf bare": (args.tuf_python, BASELINE), "tuf crypto": (args.tuf_python, CRYPTO),
                  "python-tuf tuf.api.metadata": (args.tuf_python, TUF),
                  "tuf agent's protocol imports": (args.tuf_python, AGENT_PROTOCOL),  # needs msgspec there too
                  "python-tuf over the agent's imports": (args.tuf_python, AGENT_PROTOCOL.replace(RSS, "") + TUF)}
    mb = {name: statistics.median(rss_kb(py, code) for _ in range(args.rounds)) / 1024
          for name, (py, code) in cases.items()}
    print(f"{'case (RSS after the work, median of ' + str(args.rounds) + ')':44s} {'RSS':>8s} {'over bare':>10s} "
          f"{'over Ed25519 alone':>19s}")
    for name, prefix in (("bare", ""), ("crypto", ""), ("agent's protocol imports", ""), ("edgefleet protocol.trust", ""), ("tuf bare", "tuf "),
                         ("tuf crypto", "tuf "), ("python-tuf tuf.api.metadata", "tuf "),
                         ("tuf agent's protocol imports", "tuf "), ("python-tuf over the agent's imports", "tuf ")):
        if name in mb:
            print(f"{name:44s} {mb[name]:6.1f} MB {mb[name] - mb[prefix + 'bare']:+8.1f} MB "
                  f"{mb[name] - mb[prefix + 'crypto']:+17.1f} MB")
    marginal = mb["edgefleet protocol.trust"] - mb["agent's protocol imports"]
    print(f"protocol.trust (with its work) over what the agent already loads: {marginal:+.1f} MB")
    if args.tuf_python:
        ours, theirs = mb["edgefleet protocol.trust"] - mb["crypto"], mb["python-tuf tuf.api.metadata"] - mb["tuf crypto"]
        extra = mb["python-tuf over the agent's imports"] - mb["tuf agent's protocol imports"]
        print(f"python-tuf (with its work) over what the agent already loads: {extra:+.1f} MB")
        print(f"verifier on top of Ed25519: edgefleet {ours:.1f} MB, python-tuf {theirs:.1f} MB "
              f"(ratio {theirs / ours:.2f}x)")


if __name__ == "__main__":
    main()
