"""Merge per-model training folders into one weights folder: the manifest a sequential run would write."""
import json, shutil, sys
from pathlib import Path
from toyworld.manifest import write_manifest
out = Path(sys.argv[1]); parts = [Path(p) for p in sys.argv[2:]]
out.mkdir(parents=True, exist_ok=True)
manifest = None
for part in parts:
    m = json.loads((part / "models.json").read_text())
    for name, record in m["models"].items():
        if (part / record["file"]).is_file() and (manifest is None or name not in manifest["models"] or part.name == name):
            if manifest is None:
                manifest = {k: v for k, v in m.items()}; manifest["models"] = {}
            manifest["models"][name] = record
            shutil.copyfile(part / record["file"], out / record["file"])
write_manifest(manifest, out / "models.json")
print(sorted(manifest["models"]))
