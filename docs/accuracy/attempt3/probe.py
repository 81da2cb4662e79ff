"""Attempt-3 probe on cached scenes (see docs/accuracy/README.md). Cache first:
  python docs/accuracy/attempt3/cache.py train 500000 600 $PROBE_CACHE/trainA.pt   # and 500600 -> trainB.pt
  python docs/accuracy/attempt3/cache.py val 0 60 $PROBE_CACHE/val.pt
then e.g. PYTHONPATH=. python docs/accuracy/attempt3/probe.py --types colour --keep 0 --lr 3e-4 --warmup 100 --steps 2000
Question types: colour, presence, count, location (an unknown name is silently ignored)."""
import os, argparse, json, time, math, torch
from collections import defaultdict
from ptp_ros.proxy import proxy_words
from ptp_ros.vlm.tokenizer import BASE_WORDS
from bench.proxy.train import build_model
from bench.proxy.data import answer_logits, prefix_embeddings
ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=800); ap.add_argument("--lr", type=float, default=2e-3)
ap.add_argument("--warmup", type=int, default=0); ap.add_argument("--keep", type=float, default=0.1)
ap.add_argument("--width", type=int, default=128); ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--types", default="colour,presence,count,side"); ap.add_argument("--wd", type=float, default=0.01)
ap.add_argument("--ostd", type=float, default=1.0); ap.add_argument("--factor", action="store_true")
ap.add_argument("--clip", type=float, default=0); ap.add_argument("--tag", default="")
ap.add_argument("--notile", action="store_true", help="drop structural tokens")
ap.add_argument("--eval-every", type=int, default=200); ap.add_argument("--curriculum", type=int, default=0)
a = ap.parse_args()
torch.set_num_threads(1); torch.manual_seed(0)
words = list(dict.fromkeys([*BASE_WORDS, *proxy_words()]))
model, processor = build_model(words, 0, dict(vision_width=32, vision_layers=2, text_width=a.width, text_layers=a.layers))
model.train()
types = set(a.types.split(","))
train = torch.load(os.path.join(os.environ.get("PROBE_CACHE", "/tmp/dbg"), "trainA.pt")) + torch.load(os.path.join(os.environ.get("PROBE_CACHE", "/tmp/dbg"), "trainB.pt")); val = torch.load(os.path.join(os.environ.get("PROBE_CACHE", "/tmp/dbg"), "val.pt"))
if a.factor:
    semb = torch.nn.Embedding(6, a.width); cemb = torch.nn.Embedding(6, a.width)
    for e in (semb, cemb): torch.nn.init.normal_(e.weight, std=a.ostd)
    def oracle(t):
        t = t.clamp(min=0); s = torch.where(t > 0, (t - 1) // 5 + 1, 0); c = torch.where(t > 0, (t - 1) % 5 + 1, 0)
        return semb(s) + cemb(c)
    oparams = [*semb.parameters(), *cemb.parameters()]
else:
    emb = torch.nn.Embedding(26, a.width); torch.nn.init.normal_(emb.weight, std=a.ostd)
    oracle = lambda t: emb(t.clamp(min=0)); oparams = list(emb.parameters())
params = [*model.model.language_model.parameters(), *model.lm_head.parameters(), *oparams]
opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=a.wd, betas=(0.9, 0.98))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(a.warmup, 1)))
gen = torch.Generator().manual_seed(0)
def run(d, train_mode):
    t = d["target"]
    keep = (t > 0) | (torch.rand(t.shape[0], generator=gen) < a.keep)
    if a.notile: keep &= t >= 0
    tt = {"colour"} if (train_mode and cur_step[0] < a.curriculum) else types
    idx = [i for i, q in enumerate(d["qtype"]) if q in tt]
    if not idx: return None
    feats = oracle(t[keep])
    logits = answer_logits(model, prefix_embeddings(model, d["prefix"], feats)[None], [d["suffix"][i] for i in idx], 0)
    ans = d["answer"][idx]
    return logits, ans, [d["qtype"][i] for i in idx]
def evaluate():
    model.eval(); c = defaultdict(list)
    with torch.no_grad():
        for d in val:
            r = run(d, False)
            if r is None: continue
            lg, ans, qt = r
            for ok, q in zip((lg.argmax(-1) == ans).tolist(), qt): c[q].append(ok); c["all"].append(ok)
    model.train()
    return {k: round(sum(v) / len(v), 3) for k, v in c.items()}
cur_step = [0]
start = time.time(); win = []
for step in range(a.steps):
    cur_step[0] = step
    d = train[step % len(train)]
    r = run(d, True)
    if r is None: continue
    lg, ans, _ = r
    loss = torch.nn.functional.cross_entropy(lg, ans)
    opt.zero_grad(); loss.backward()
    if a.clip: torch.nn.utils.clip_grad_norm_(params, a.clip)
    opt.step(); sched.step()
    win.append(loss.item())
    if (step + 1) % a.eval_every == 0:
        print(json.dumps({"tag": a.tag, "step": step + 1, "loss": round(sum(win) / len(win), 3), **evaluate(), "t": round(time.time() - start)}), flush=True); win = []
