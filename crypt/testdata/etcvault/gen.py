import json, os, subprocess
ETCVAULT = os.environ.get("ETCVAULT", "./etcvault")
vals = {
 "short": "hello",
 "empty": "",
 "short-max": "x"*190,        # the most RSA-2048 OAEP-SHA256 takes: still the short form
 "long-min": "y"*191,         # one byte more: the long form
 "long-blocks": "z"*320,      # a multiple of the AES block: a whole block of padding
 "long-text": "".join(chr(97+i%26) for i in range(300)) + " :,=/ üñî ::",
 "colons": "a:b::c,d",
}
out = []
for name, v in vals.items():
    s = subprocess.run([ETCVAULT,"transform","-keychain","keychain","ETCVAULT::plain:etcvault-test:%s::ETCVAULT" % v],capture_output=True,text=True,check=True)
    assert s.stderr == "", s.stderr
    stored = s.stdout.rstrip("\n")
    assert stored.startswith("ETCVAULT::1:etcvault-test:"), stored
    # etcvault reads its own value back
    r = subprocess.run([ETCVAULT,"transform","-keychain","keychain",stored],capture_output=True,text=True,check=True)
    assert r.stdout.rstrip("\n") == v and r.stderr == "", (name, r.stdout, r.stderr)
    out.append({"name": name, "plaintext": v, "stored": stored})
json.dump(out, open("vectors.json","w"), indent=1, ensure_ascii=False)
print([ (o["name"], ":long:" in o["stored"]) for o in out])
