// A js-libp2p peer for tests/test_interop_js.py, driven over stdin/stdout.
//
// Listens on /ip4/127.0.0.1/tcp/0 (or the comma-separated CLAWNODE_JS_LISTEN) with TCP + Noise +
// Yamux, identify, ping, the circuit relay v2 transport (dials /p2p-circuit addresses), DCUtR,
// AutoNAT v2 when CLAWNODE_JS_AUTONAT_V2=1 (client and server, js-libp2p's as they are), and a
// Kademlia DHT in server mode on clawnode's protocol id. Records under the
// /clawtest/ namespace are accepted as they are; records under /clawnode/ (capability
// records) pass clawnodeRecordProblem below, js's own port of what clawnode's validator
// (dht/records.py verify_record, dht/record_validator.py) checks that js can check.
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
//   get {key}                   -> {best: {from, value} | null, responses: [{from, value}],
//                                   values: [{from, value}] (every VALUE get() yielded, its own copy's from js),
//                                   refused: [peer ids whose GET_VALUE answer js's validator refused]}
//   validate {key, value}       -> {problem: why js's validator refuses the record, or null}
//   provide {cid}               -> {sent_to: [peer ids the ADD_PROVIDER was sent to]}
//   find_providers {cid}        -> {providers: [{from, peer_id, addrs}]}  every GET_PROVIDERS answer, ours included
//   routing_table               -> {peers: [peer ids in the DHT routing table]}
//   connections {peer_id}       -> {connections: [{remote_addr, direction, limited}]}
//   addresses                   -> {addresses: [{addr, verified, type}]} (the address manager's view:
//                                   AutoNAT v2's client marks an address verified once a server reached it)
//   exit                        -> {} then the process ends
// Keys are UTF-8 text; values are UTF-8 text, or base64 when the request says
// "encoding":"base64" (then values in the reply are base64 too). Closing stdin also ends the process.

import { createInterface } from 'node:readline'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { autoNATv2 } from '@libp2p/autonat-v2'
import { circuitRelayTransport } from '@libp2p/circuit-relay-v2'
import { dcutr } from '@libp2p/dcutr'
import { identify } from '@libp2p/identify'
import { publicKeyFromProtobuf } from '@libp2p/crypto/keys'
import { kadDHT } from '@libp2p/kad-dht'
import { peerIdFromPublicKey, peerIdFromString } from '@libp2p/peer-id'
import { ping } from '@libp2p/ping'
import { tcp } from '@libp2p/tcp'
import { multiaddr } from '@multiformats/multiaddr'
import { createLibp2p } from 'libp2p'
import { secp256k1 } from '@noble/curves/secp256k1.js'
import { sha256 } from '@noble/hashes/sha2.js'
import { keccak_256 } from '@noble/hashes/sha3.js'
import { base32 } from 'multiformats/bases/base32'
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
const untext = new TextDecoder('utf-8', { fatal: true })

// --- clawnode capability records (the /clawnode/ namespace) ---------------------------------
// A record is a libp2p signed envelope (public_key = 1, payload_type = 2, payload = 3,
// signature = 5) over canonical JSON. What js checks, as dht/records.py does: the size, the
// payload type, the envelope signature (@libp2p/crypto), that the payload names its signer,
// that the key is the signer's record key (or the legacy /clawnode/<peer id>), issued/expiry
// times and the sequence number, and the wallet's EIP-191 signature binding the peer id.
// What only clawnode checks: the full schema (pydantic), the canonical encoding (numbers above
// 2^53 lose precision in JSON.parse), schema safety, private data, and sequence replay.
const RECORD_NAMESPACE = 'clawnode'
const RECORD_DOMAIN = 'clawnode-capability-record'
const RECORD_PAYLOAD_TYPE = '/clawnode/capability-record/1'
const MAX_RECORD_BYTES = 8 * 1024
const RECORD_DIGEST_BYTES = 24

function readVarint (buf, pos) {
  let value = 0
  for (let shift = 0; shift < 35; shift += 7) {
    if (pos >= buf.length) throw new Error('truncated varint')
    const byte = buf[pos++]
    value += (byte & 0x7f) * 2 ** shift
    if ((byte & 0x80) === 0) return [value, pos]
  }
  throw new Error('varint too long')
}

function writeVarint (value) {
  const out = []
  while (value >= 0x80) { out.push((value & 0x7f) | 0x80); value = Math.floor(value / 128) }
  out.push(value)
  return out
}

function concat (parts) {
  const out = new Uint8Array(parts.reduce((n, part) => n + part.length, 0))
  let at = 0
  for (const part of parts) { out.set(part, at); at += part.length }
  return out
}

// The envelope's length-delimited fields by number; anything else in it is refused.
function decodeEnvelope (buf) {
  const fields = {}
  let pos = 0
  while (pos < buf.length) {
    let tag, length
    [tag, pos] = readVarint(buf, pos)
    if ((tag & 7) !== 2) throw new Error(`envelope field ${tag >> 3} is not bytes`)
    ;[length, pos] = readVarint(buf, pos)
    if (pos + length > buf.length) throw new Error('truncated envelope')
    fields[tag >> 3] = buf.subarray(pos, pos + length)
    pos += length
  }
  for (const number of [1, 2, 3, 5]) if (fields[number] == null) throw new Error(`envelope lacks field ${number}`)
  return { publicKey: fields[1], payloadType: fields[2], payload: fields[3], signature: fields[5] }
}

// /clawnode/<base32 of sha256("clawnode-record:" + peer id)[:24]>, as dht/record_validator.py record_key.
function recordKey (peerId) {
  const digest = sha256(text.encode(`clawnode-record:${peerId}`)).subarray(0, RECORD_DIGEST_BYTES)
  return `/${RECORD_NAMESPACE}/${base32.baseEncode(digest)}`
}

function hex (bytes) {
  return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('')
}

// The address that signed `message` under EIP-191 (personal_sign), as eth_account recovers it.
function eip191Signer (message, signatureHex) {
  const signature = Uint8Array.from(Buffer.from(signatureHex.slice(2), 'hex'))
  const body = text.encode(message)
  const digest = keccak_256(concat([text.encode(`\x19Ethereum Signed Message:\n${body.length}`), body]))
  let v = signature[64]
  if (v >= 27) v -= 27
  if (v !== 0 && v !== 1) throw new Error('bad recovery id')
  const recovered = secp256k1.Signature.fromBytes(concat([[v], signature.subarray(0, 64)]), 'recovered')
  const point = recovered.recoverPublicKey(digest)
  return '0x' + hex(keccak_256(point.toBytes(false).subarray(1)).subarray(12))
}

const isCount = (n) => Number.isSafeInteger(n) && n >= 0

// Why js refuses a /clawnode/ record stored under `key` (both bytes), or null if it passes.
async function clawnodeRecordProblem (key, value, now = Date.now() / 1000) {
  if (value.length > MAX_RECORD_BYTES) return 'oversized'
  let envelope, record
  try {
    envelope = decodeEnvelope(value)
  } catch (err) {
    return `bad_signature: not a signed envelope (${err.message})`
  }
  if (untext.decode(envelope.payloadType) !== RECORD_PAYLOAD_TYPE) return 'bad_signature: another kind of object'
  let publicKey
  try {
    publicKey = publicKeyFromProtobuf(envelope.publicKey)
  } catch {
    return 'bad_signature: not a public key'
  }
  const domain = text.encode(RECORD_DOMAIN)
  const unsigned = concat([
    writeVarint(domain.length), domain,
    writeVarint(envelope.payloadType.length), envelope.payloadType,
    writeVarint(envelope.payload.length), envelope.payload
  ])
  if (!(await publicKey.verify(unsigned, envelope.signature))) return 'bad_signature: the signature does not verify'
  const signer = peerIdFromPublicKey(publicKey).toString()
  try {
    record = JSON.parse(untext.decode(envelope.payload))
  } catch {
    return 'schema_invalid: the payload is not JSON'
  }
  if (record == null || typeof record !== 'object' || Array.isArray(record)) return 'schema_invalid: not an object'
  if (record.peer_id !== signer) return 'wrong_signer: signed by a peer other than the one it describes'
  const keyText = untext.decode(key)
  if (keyText !== recordKey(signer) && keyText !== `/${RECORD_NAMESPACE}/${signer}`) {
    return "wrong_signer: stored under another peer's key"
  }
  const { seq, issued_at: issuedAt, expires_at: expiresAt, wallet } = record
  if (!isCount(seq) || seq < 1 || !isCount(issuedAt) || !isCount(expiresAt)) return 'schema_invalid: seq or times'
  if (expiresAt <= issuedAt) return 'schema_invalid: expires_at must be after issued_at'
  if (expiresAt <= now) return 'expired'
  if (wallet == null || typeof wallet.address !== 'string' || !/^0x[0-9a-fA-F]{40}$/.test(wallet.address) ||
      typeof wallet.signature !== 'string' || !/^0x[0-9a-fA-F]{130}$/.test(wallet.signature)) {
    return 'schema_invalid: wallet'
  }
  let payout
  try {
    payout = eip191Signer(`clawnode payout address for peer ${signer}`, wallet.signature)
  } catch {
    return 'bad_wallet_binding: not a signature'
  }
  if (payout !== wallet.address.toLowerCase()) return 'bad_wallet_binding: the wallet did not sign this peer id'
  return null
}

async function validateClawnodeRecord (key, value) {
  const problem = await clawnodeRecordProblem(key, value)
  if (problem != null) throw new Error(`clawnode record refused: ${problem}`)
}

// The highest sequence number among the valid records (py: CapabilityRecordValidator.select).
async function selectClawnodeRecord (key, values) {
  let best = 0
  let bestSeq = -1
  for (const [index, value] of values.entries()) {
    if ((await clawnodeRecordProblem(key, value)) != null) continue
    const seq = JSON.parse(untext.decode(decodeEnvelope(value).payload)).seq
    if (seq > bestSeq) { best = index; bestSeq = seq }
  }
  return best
}

const decodeValue = (value, encoding) => encoding === 'base64' ? Uint8Array.from(Buffer.from(value, 'base64')) : text.encode(value)
const encodeValue = (value, encoding) => encoding === 'base64' ? Buffer.from(value).toString('base64') : untext.decode(value)

const LISTEN = (process.env.CLAWNODE_JS_LISTEN ?? '/ip4/127.0.0.1/tcp/0').split(',')
// Off unless asked for: its client walks the DHT looking for servers while an address is unverified.
const AUTONAT_V2 = process.env.CLAWNODE_JS_AUTONAT_V2 === '1' ? { autonatV2: autoNATv2() } : {}

const node = await createLibp2p({
  addresses: { listen: LISTEN },
  transports: [tcp(), circuitRelayTransport()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: {
    ...AUTONAT_V2,
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
      validators: { [TEST_NAMESPACE]: async () => {}, [RECORD_NAMESPACE]: validateClawnodeRecord },
      selectors: { [TEST_NAMESPACE]: () => 0, [RECORD_NAMESPACE]: selectClawnodeRecord }
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

  async put ({ key, value, encoding }) {
    const bytes = decodeValue(value, encoding)
    const storedAt = new Set()
    for await (const event of node.services.dht.put(text.encode(key), bytes)) {
      if (event.name === 'PEER_RESPONSE' && event.record != null &&
          Buffer.compare(Buffer.from(event.record.value), Buffer.from(bytes)) === 0) {
        storedAt.add(event.from.toString())
      }
    }
    return { stored_at: [...storedAt] }
  },

  async get ({ key, encoding }) {
    // responses: every remote GET_VALUE answer that carried a record js's validator took;
    // refused: the peers whose answer it refused; best: the value get() settles on (our own
    // copy first, if we hold a valid one).
    const responses = []
    const refused = []
    const values = []
    let best = null
    for await (const event of node.services.dht.get(text.encode(key))) {
      if (event.name === 'PEER_RESPONSE' && event.messageName === 'GET_VALUE' && event.record != null) {
        responses.push({ from: event.from.toString(), value: encodeValue(event.record.value, encoding) })
      } else if (event.name === 'QUERY_ERROR' && /invalid record/.test(event.error?.message ?? '')) {
        refused.push(event.from.toString())
      } else if (event.name === 'VALUE') {
        best = { from: event.from.toString(), value: encodeValue(event.value, encoding) }
        values.push(best)
      }
    }
    return { best, responses, values, refused }
  },

  async validate ({ key, value, encoding }) {
    return { problem: await clawnodeRecordProblem(text.encode(key), decodeValue(value, encoding)) }
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

  async addresses () {
    return {
      addresses: node.components.addressManager.getAddressesWithMetadata().map((a) => ({
        addr: a.multiaddr.toString(), verified: a.verified, type: a.type
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
  // getMultiaddrs() names only verified addresses: a public one is not until AutoNAT verified it.
  addrs: node.components.transportManager.getAddrs().map((ma) => `${ma.toString()}/p2p/${node.peerId.toString()}`)
})
