#!/usr/bin/env python3
"""Pack real grant seeds for the `grant` target: [grant_len u16 LE][sig_len u16 LE][grant][sig][allowed_signers].

Usage: make-grant-seeds.py OUT_DIR GRANT SIG ALLOWED_SIGNERS [NAME]
GRANT/SIG come from a real `aap session start` (state/grants/<id>.grant and .grant.sig, or a
grant signed by hand with `ssh-keygen -Y sign -n aap-grant -f KEY GRANT`). See docs/fuzzing.md.
"""
import struct, sys, pathlib

out, grant, sig, signers = (pathlib.Path(p) for p in sys.argv[1:5])
name = sys.argv[5] if len(sys.argv) > 5 else "seed"
g, s, a = grant.read_bytes(), sig.read_bytes(), signers.read_bytes()
out.mkdir(parents=True, exist_ok=True)
(out / name).write_bytes(struct.pack("<HH", len(g), len(s)) + g + s + a)
