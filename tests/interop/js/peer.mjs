// A js-libp2p peer for tests/test_interop_js.py, driven over stdin/stdout.
//
// Listens on /ip4/127.0.0.1/tcp/0 with TCP + Noise + Yamux, identify, ping, the
// circuit relay v2 transport (dials /p2p-circuit addresses), DCUtR and a
// Kademlia DHT in server mode on clawnode's protocol id. Records under the
// /clawtest/ namespace are accepted as they are.
//
// Protocol: one JSON object per line. The first line written is
//   {"event":"ready","peer_id":"12D3...","addrs":["/ip4/127.0.0.1/tcp/N/p2p/12D3..."]}
// then every request {"id":N,"cmd":"...",...} gets exactly one reply
//   {"id":N,"ok":true,...}  or  {"id":N,"ok":false,"error":"..."}
// Commands:
//   dial {addr}                 -> {peer_id}
//   ping {peer_id}              -> {rtt_ms}
//   identify {peer_id}          -> {protocols, agent_version, listen_addrs} (fresh identify exchange)
//   put {key, value}            -> {stored_at: [peer ids that answered the PUT_VALUE with the record]}
//   get {key}                   -> {best: {from, value} | null, responses: [{from, value}]}
//   provide {cid}               -> {sent_to: [peer ids the ADD_PROVIDER was sent to]}
//   find_providers {cid}        -> {providers: [{from, peer_id, addrs}]}  every GET_PROVIDERS answer, ours included
//   routing_table               -> {peers: [peer ids in the DHT routing table]}
//   connections {peer_id}       -> {connections: [{remote_addr, direction, limited}]}
//   exit                        -> {} then the process ends
// Keys and values are UTF-8 text. Closing stdin also ends the process.

import { createInterface } from 'node:readline'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { dcutr } from '@libp2p/dcutr'
import { identify } from '@libp2p/identify'
import { kadDHT } from '@libp2p/kad-dht'
import { peerIdFromString } from '@libp2p/peer-id'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { CID } from 'multiformats/cid'

// js-libp2p 3.x uses Promise.withResolvers, which Node gained in 22.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function () {
    let resolve, reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const KAD_PROTOCOL = process.env.CLAWNODE_KAD_PROTOCOL ?? '/clawnode/kad/1.0.0'
const TEST_NAMESPACE = 'clawtest'

const text = new TextEncoder()
const untext = new TextDecoder()

const node = await createLibp2p({
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp(), circuitRelayTransport()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    identify: identify(),
    dcutr: dcutr(),
    // kad-dht pings each new contact with this same service; the default limit
    // of one outbound ping stream makes a test's ping right after a dial fail.
    ping: ping({ maxOutboundStreams: 4 }),
    dht: kadDHT({
      protocol: KAD_PROTOCOL,
      clientMode: false,
      // The default mapper drops private addresses, i.e. all of loopback.
      peerInfoMapper: (peer) => peer,
      validators: { [TEST_NAMESPACE]: async () => {} },
      selectors: { [TEST_NAMESPACE]: () => 0 }
    })
  }
})

// DCUtR dials only public addresses; on loopback every address is private to js,
// so this test peer takes any direct TCP address a CONNECT names (the wire
// exchange, roles and timing are js-libp2p's own).
node.services.dcutr.getDialableMultiaddrs = (addrs) => {
  const found = []
  for (const addr of addrs) {
    try {
      const ma = multiaddr(addr)
      if (!ma.toString().includes('/p2p-circuit') && ma.toString().includes('/tcp/')) found.push(ma)
    } catch {}
  }
  return found
}

function send (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

async function stop () {
  try {
    await node.stop()
  } finally {
    process.exit(0)
  }
}

const commands = {
  async dial ({ addr }) {
    const connection = await node.dial(multiaddr(addr))
    return { peer_id: connection.remotePeer.toString() }
  },

  async ping ({ peer_id: peerId }) {
    return { rtt_ms: await node.services.ping.ping(peerIdFromString(peerId)) }
  },

  async identify ({ peer_id: peerId }) {
    const [connection] = node.getConnections(peerIdFromString(peerId))
    if (connection == null) throw new Error(`not connected to ${peerId}`)
    const result = await node.services.identify.identify(connection)
    return {
      protocols: result.protocols,
      agent_version: result.agentVersion ?? null,
      listen_addrs: result.listenAddrs.map((ma) => ma.toString())
    }
  },

  async put ({ key, value }) {
    const storedAt = new Set()
    for await (const event of node.services.dht.put(text.encode(key), text.encode(value))) {
      if (event.name === 'PEER_RESPONSE' && event.record != null &&
          untext.decode(event.record.value) === value) {
        storedAt.add(event.from.toString())
      }
    }
    return { stored_at: [...storedAt] }
  },

  async get ({ key }) {
    // responses: every remote GET_VALUE answer that carried a record;
    // best: the value get() settles on (our own copy first, if we hold one).
    const responses = []
    let best = null
    for await (const event of node.services.dht.get(text.encode(key))) {
      if (event.name === 'PEER_RESPONSE' && event.messageName === 'GET_VALUE' && event.record != null) {
        responses.push({ from: event.from.toString(), value: untext.decode(event.record.value) })
      } else if (event.name === 'VALUE') {
        best = { from: event.from.toString(), value: untext.decode(event.value) }
      }
    }
    return { best, responses }
  },

  async provide ({ cid }) {
    const sentTo = new Set()
    for await (const event of node.services.dht.provide(CID.parse(cid))) {
      if (event.name === 'PEER_RESPONSE' && event.messageName === 'ADD_PROVIDER') {
        sentTo.add(event.from.toString())
      }
    }
    return { sent_to: [...sentTo] }
  },

  async find_providers ({ cid }) {
    // Every GET_PROVIDERS answer, our own provider store's included (from = us);
    // the PROVIDER events would hide a remote answer naming a provider we know.
    const providers = []
    for await (const event of node.services.dht.findProviders(CID.parse(cid))) {
      if (event.name !== 'PEER_RESPONSE' || event.messageName !== 'GET_PROVIDERS') continue
      for (const provider of event.providers) {
        providers.push({
          from: event.from.toString(),
          peer_id: provider.id.toString(),
          addrs: provider.multiaddrs.map((ma) => ma.toString())
        })
      }
    }
    return { providers }
  },

  async routing_table () {
    // Internal API: the DHT's k-buckets, to wait until the peers know each other.
    const kb = node.services.dht.routingTable.kb
    return { peers: kb == null ? [] : [...kb.toIterable()].map((peer) => peer.peerId.toString()) }
  },

  async connections ({ peer_id: peerId }) {
    return {
      connections: node.getConnections(peerIdFromString(peerId)).map((connection) => ({
        remote_addr: connection.remoteAddr.toString(),
        direction: connection.direction,
        limited: connection.limits != null
      }))
    }
  },

  async exit () {
    setImmediate(stop)
    return {}
  }
}

// Requests run concurrently; each reply carries its request's id.
async function handle (line) {
  let request
  try {
    request = JSON.parse(line)
  } catch (err) {
    send({ id: null, ok: false, error: `bad JSON: ${err.message}` })
    return
  }
  const { id = null, cmd } = request
  const command = commands[cmd]
  if (command == null) {
    send({ id, ok: false, error: `unknown command ${cmd}` })
    return
  }
  try {
    send({ id, ok: true, ...(await command(request)) })
  } catch (err) {
    send({ id, ok: false, error: `${err.name}: ${err.message}` })
  }
}

const lines = createInterface({ input: process.stdin })
lines.on('line', (line) => { if (line.trim() !== '') handle(line) })
lines.on('close', stop)

send({
  event: 'ready',
  peer_id: node.peerId.toString(),
  addrs: node.getMultiaddrs().map((ma) => ma.toString())
})
