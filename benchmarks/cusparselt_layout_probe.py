"""Probe of cuSPARSELt call variants on a CUDA GPU: operand layout (x^T view vs a row-major
copy), transpose_result, algorithm search, split-k, and torch's public semi-structured API.
Prints one line per (weight, tokens). It chose the layout and the per-bucket algorithm search
that crepe_plugin.vllm.sparse uses (results: benchmarks/results/h100/cusparselt_layout_probe.txt).

usage: python benchmarks/cusparselt_layout_probe.py
"""
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, '.')
from crepe_plugin.core.masks import nm_mask
def tg(fn, reps=20, trials=11):
    s=torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    g=torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps): fn()
    g.replay(); torch.cuda.synchronize(); ts=[]
    for _ in range(trials):
        a,b=torch.cuda.Event(enable_timing=True),torch.cuda.Event(enable_timing=True)
        a.record(); g.replay(); b.record(); b.synchronize(); ts.append(a.elapsed_time(b)*1000/reps)
    return statistics.median(ts)
for (o,i) in [(4096,4096),(14336,4096),(4096,14336)]:
    w=torch.randn(o,i,device='cuda'); w=(w*nm_mask(w.abs(),2,4)).bfloat16()
    p=torch._cslt_compress(w)
    for t in [16,256,4096]:
        x=torch.randn(t,i,device='cuda',dtype=torch.bfloat16)
        xt=x.t().contiguous()
        res={}
        res['dense']=tg(lambda: F.linear(x,w))
        res['A0 view T']=tg(lambda: torch._cslt_sparse_mm(p,x.t(),transpose_result=True))
        res['A0 view noT']=tg(lambda: torch._cslt_sparse_mm(p,x.t()))
        res['A0 rowmajorB noT']=tg(lambda: torch._cslt_sparse_mm(p,xt))
        res['A0 rowmajorB T']=tg(lambda: torch._cslt_sparse_mm(p,xt,transpose_result=True))
        try:
            alg=torch._cslt_sparse_mm_search(p,x.t(),transpose_result=True)
            res[f'search alg{alg} view T']=tg(lambda: torch._cslt_sparse_mm(p,x.t(),transpose_result=True,alg_id=alg))
            alg2=torch._cslt_sparse_mm_search(p,xt)
            res[f'search alg{alg2} rowmajorB noT']=tg(lambda: torch._cslt_sparse_mm(p,xt,alg_id=alg2))
        except Exception as e: res['search err '+str(e)[:80]]=0
        for sk in [2,4,8]:
            try: res[f'splitk{sk} view T']=tg(lambda: torch._cslt_sparse_mm(p,x.t(),transpose_result=True,split_k=sk))
            except Exception as e: res[f'splitk{sk} err']=0
        print(o,i,t,' '.join(f'{k}={v:.1f}' for k,v in res.items()),flush=True)
# semi_structured public API
from torch.sparse import to_sparse_semi_structured, SparseSemiStructuredTensor
SparseSemiStructuredTensor._FORCE_CUTLASS=False
w=torch.randn(4096,4096,device='cuda'); w=(w*nm_mask(w.abs(),2,4)).bfloat16()
ws=to_sparse_semi_structured(w)
for t in [16,256,4096]:
    x=torch.randn(t,4096,device='cuda',dtype=torch.bfloat16)
    print('public api', t, tg(lambda: F.linear(x,w)), tg(lambda: F.linear(x,ws)))
SparseSemiStructuredTensor._FORCE_CUTLASS=True
ws=to_sparse_semi_structured(w)
for t in [16,256,4096]:
    x=torch.randn(t,4096,device='cuda',dtype=torch.bfloat16)
    try: print('cutlass api', t, tg(lambda: F.linear(x,w)), tg(lambda: F.linear(x,ws)))
    except Exception as e: print('cutlass err', str(e)[:200])
