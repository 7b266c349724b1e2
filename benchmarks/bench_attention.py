import torch, time, sys
sys.path.insert(0, '.')
import train_gpt as tg
from torch.nn.attention import SDPBackend, sdpa_kernel
B,T,H,Hk,D=48,2048,8,4,64
q=torch.randn(B,T,H,D,device='cuda',dtype=torch.bfloat16,requires_grad=True); k=torch.randn(B,T,Hk,D,device='cuda',dtype=torch.bfloat16,requires_grad=True); v=torch.randn_like(k,requires_grad=True)
def t(ctx):
    with ctx:
        for i in range(8):
            if i==3: torch.cuda.synchronize(); t0=time.perf_counter()
            tg.causal_attention(q,k,v).float().sum().backward()
        torch.cuda.synchronize()
    return (time.perf_counter()-t0)/5*1000
import contextlib
for name,b in [("default",None),("flash",SDPBackend.FLASH_ATTENTION),("cudnn",SDPBackend.CUDNN_ATTENTION),("efficient",SDPBackend.EFFICIENT_ATTENTION),("default",None)]:
    try: print("attn B=48", name, f"{t(sdpa_kernel([b]) if b else contextlib.nullcontext()):.2f}ms fwd+bwd")
    except Exception as e: print(name, "fail", str(e)[:80])
torch.backends.cuda.enable_math_sdp(False)
print("attn no-math default", f"{t(contextlib.nullcontext()):.2f}ms")
