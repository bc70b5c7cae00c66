"""Hostile-input benchmark for chatgate (a stopgap until chatgate-load has the scenario).

Usage: python3 tests/load/hostile.py PORT SERVER_PID SECONDS HOSTILE_SOCKETS HOSTILE_REST
Needs `pip install websockets`. Start the server with
CHATGATE_SERVER__TRUSTED_PROXIES=127.0.0.1/32 so each client's X-Forwarded-For address
counts as its own (per-IP limits apply per client, as behind an ingress).

Hostile sockets (one channel of their own) loop over a padded typing_start frame of
~13.99 MB, a padded 2 MiB text message and a 10 MiB audio data URL, reconnecting when
closed; hostile REST clients post ~13.99 MB padded bodies. 20 healthy clients in another
channel send 20 msgs/s in total; their delivery latency and loss are reported, with the
server's peak RSS growth (VmRSS sampled every 50 ms). Loopback only; bounded in time.
"""
import asyncio, json, os, sys, time, base64
import websockets
PORT=int(sys.argv[1]); PID=int(sys.argv[2]); DUR=float(sys.argv[3]); NWS=int(sys.argv[4]); NREST=int(sys.argv[5])
MAX=13_990_000
def padded(kind, n, extra=''):
    pad=','.join(['{}']*(n//3))
    return '{"type":"%s","content":"x"%s,"pad":[%s]}'%(kind,extra,pad)
TYP=padded('typing_start',MAX).encode()
TXT2=padded('message',2<<20)
aud=b'\x1a\x45\xdf\xa3\x42\x82\x84webm'+bytes(10*1024*1024-11)
MEDIA=json.dumps({"type":"message","message_type":"audio","content":"data:audio/webm;base64,"+base64.b64encode(aud).decode()})
REST=padded('message',MAX-100,',"sender":"amp"').replace('"type":"message",','').encode()
def rss():
    for l in open(f'/proc/{PID}/status'):
        if l.startswith('VmRSS'): return int(l.split()[1])*1024
stats={'ws_closed':{}, 'ws_err':{}, 'rest':{}, 'lat':[], 'sent':0, 'recv':0}
stop=time.time()+DUR
async def hostile_ws(i):
    closed=False
    while time.time()<stop:
        try:
            async with websockets.connect(f'ws://127.0.0.1:{PORT}/ws/chat?username=h{i}&channel=hostile',max_size=None,additional_headers={'X-Forwarded-For':f'10.1.0.{i+1}'}) as ws:
                async def reader():
                    async for m in ws:
                        try:
                            f=json.loads(m)
                            if f.get('type')=='error': stats['ws_err'][f['code']]=stats['ws_err'].get(f['code'],0)+1
                        except Exception: pass
                r=asyncio.create_task(reader())
                try:
                    for payload in [TYP, TXT2, MEDIA]*1000:
                        if time.time()>stop: break
                        await ws.send(payload if isinstance(payload,str) else payload.decode())
                except websockets.ConnectionClosed as e:
                    pass
                await asyncio.wait([r],timeout=2)
                code=ws.close_code
                stats['ws_closed'][str(code)]=stats['ws_closed'].get(str(code),0)+1
        except Exception as e:
            k=type(e).__name__+':'+str(e)[:40]
            stats['ws_closed'][k]=stats['ws_closed'].get(k,0)+1
            await asyncio.sleep(1)
async def hostile_rest(i):
    while time.time()<stop:
        try:
            r,w=await asyncio.open_connection('127.0.0.1',PORT)
            w.write(b'POST /api/chat/message HTTP/1.1\r\nhost: x\r\nx-forwarded-for: 10.2.0.%d\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n'%(i+1,len(REST))+REST)
            await w.drain()
            line=await r.readline()
            st=line.split()[1].decode() if line else 'eof'
            stats['rest'][st]=stats['rest'].get(st,0)+1
            w.close()
        except Exception as e:
            stats['rest'][type(e).__name__]=stats['rest'].get(type(e).__name__,0)+1
async def healthy():
    subs=[await websockets.connect(f'ws://127.0.0.1:{PORT}/ws/chat?username=g{i}&channel=healthy',additional_headers={'X-Forwarded-For':f'10.0.0.{i+1}'}) for i in range(20)]
    async def read(ws,me):
        async for m in ws:
            f=json.loads(m)
            if f.get('type')=='message' and f['sender']!=me:
                t=float(f['content']); stats['lat'].append(time.time()-t); stats['recv']+=1
    tasks=[asyncio.create_task(read(ws,f'g{i}')) for i,ws in enumerate(subs)]
    i=0
    while time.time()<stop:
        ws=subs[i%20]; i+=1
        await ws.send(json.dumps({"type":"message","content":repr(time.time())}))
        stats['sent']+=1
        await asyncio.sleep(0.05)
    await asyncio.sleep(3)
    for t in tasks: t.cancel()
async def sampler(base):
    peak=0
    while time.time()<stop+3:
        peak=max(peak,rss()-base); await asyncio.sleep(0.05)
    stats['peak_growth_mib']=peak/1048576
async def main():
    base=rss(); stats['baseline_mib']=base/1048576
    await asyncio.gather(sampler(base), healthy(), *[hostile_ws(i) for i in range(NWS)], *[hostile_rest(i) for i in range(NREST)])
    lat=sorted(stats['lat'])
    stats['expected_recv']=stats['sent']*19
    if lat:
        stats['p50_ms']=lat[len(lat)//2]*1000; stats['p99_ms']=lat[int(len(lat)*0.99)]*1000; stats['max_ms']=lat[-1]*1000
    del stats['lat']
    print(json.dumps(stats,indent=1))
asyncio.run(main())
