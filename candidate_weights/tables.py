"""README tables from models.json (training probes) and the demo's metrics.json."""
import json, sys
from toyworld.generator import FACTORS
man = json.load(open(sys.argv[1]))["models"]; m = json.load(open(sys.argv[2]))
CEIL = 0.995
print("| model | " + " | ".join(FACTORS) + " | encoded |"); print("|---" * (len(FACTORS) + 2) + "|")
for name, rec in man.items():
    if "probes" not in rec["metrics"]: continue
    p = rec["metrics"]["probes"]
    print(f"| {name} | " + " | ".join(f"{p[f]['probe']:.2f} {'✓' if p[f]['encoded'] else '✗'}" for f in FACTORS) + f" | {len(rec['metrics']['encoded'])}/6 |")
print("| threshold | " + " | ".join(f"{p[f]['threshold']:.3g}" for f in FACTORS) + " | |")
print()
def comp(vals):
    beats=[f for f,(a,b) in vals.items() if a>b]; ties=[f for f,(a,b) in vals.items() if f not in beats and min(a,b)>=CEIL]
    loss=[f for f in vals if f not in beats and f not in ties]
    return ("holds" if not loss else "does not hold"), ", ".join(f"{f} {a:.2f} vs {b:.2f}" for f,(a,b) in vals.items())
print("| model | top-k beats random-k (probe, encoded factors) | selected beat full (retrieval P@10) | CompAlign held-out cosine ≥ 0.85 | heatmap mIoU vs attention / Grad-CAM |")
print("|---|---|---|---|---|")
for name in m["encoded"]:
    enc=[f for f in FACTORS if m["encoded"][name][f]["encoded"]]
    pr=m["property_probe"][name]; rt=m["retrieval_p_at_10"][name]; s=m["segmentation"][name]
    a=comp({f:(pr[f]["top_k"],pr[f]["random_k"]) for f in enc}); b=comp({f:(rt[f]["components"],rt[f]["full"]) for f in enc})
    cos=m["alignment"][name]; fits=m.get("alignment_linear_fits",{}).get(name)
    fit = f" (linear fits: representation {fits['representation']:.2f}, encoded factors {fits['encoded_factors']:.2f}, all {fits['all_factors']:.2f})" if fits else ""
    print(f"| {name} | {a[0]}: {a[1]} | {b[0]}: {b[1]} | {'holds' if cos>=0.85 else 'does not hold'}: {cos:.3f}{fit} | {s['miou']:.3f} vs {s['baseline']['miou']:.3f} / {s['gradient_baseline']['miou']:.3f} |")
for name, s in m["spurious"].items():
    print(f"\nspurious {name}: worst group {s['worst_group_before']:.3f} -> {s['worst_group_after']:.3f} (k={s['k']}), average {s['average_before']:.3f} -> {s['average_after']:.3f}")
print("seconds", {k: (round(sum(v.values()),1) if isinstance(v, dict) else round(v,1)) for k,v in m["seconds"].items()})
