"""Matrix-vector time of one vector by sixteen 8192 x 2048 matrices (1 GB in float32, more than the cache holds)
in float32, bfloat16, int8 and int4, with torch's CPU kernels the quantized layers use. One intra-op thread, timed
in this process's CPU seconds (best of 3), so a busy shared machine disturbs it less; prints markdown rows."""

import torch, time
torch.set_num_threads(1)
torch.manual_seed(0)
N,K,L=8192,2048,16
ws=[torch.randn(N,K) for _ in range(L)]
def bench(f, n=10):
    for _ in range(2): f()
    best=1e9
    for _ in range(3):
        t=time.process_time()
        for _ in range(n): f()
        best=min(best,(time.process_time()-t)/n*1000)
    return best
x=torch.randn(1,K)
r={}
r['float32']=bench(lambda: [x@w.t() for w in ws])
wb=[w.bfloat16() for w in ws]; xb=x.bfloat16()
r['bfloat16']=bench(lambda: [xb@w.t() for w in wb]); del wb
q8=[(w/ (w.abs().amax(1,keepdim=True)/127)).round().to(torch.int8) for w in ws]; s=torch.rand(N).bfloat16()
r['int8 (bf16 act)']=bench(lambda: [torch._weight_int8pack_mm(xb, q, s) for q in q8]); del q8
p4=[torch._convert_weight_to_int4pack_for_cpu(torch.randint(0,16,(N,K),dtype=torch.int32),1) for _ in range(L)]
sz=torch.rand(K//128,N,2).bfloat16()
r['int4 g128 (bf16 act)']=bench(lambda: [torch._weight_int4pack_mm_for_cpu(xb, p, 128, sz) for p in p4])
for k,v in r.items(): print(f"| {k} | {v:.2f} ms | {r['float32']/v:.2f}x |")
