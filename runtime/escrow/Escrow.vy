# pragma version 0.4.3
"""
@title clawnode lease escrow (native coin)
@notice A payer locks coin for one lease; the payee is paid in parts; the rest goes back to the
        payer after deadline + dispute window; inside that window either party can freeze the
        escrow and only the arbiter then splits it.
@dev Rules of this file:
     - An escrow is keyed by keccak256(abi_encode(payer, id)): nobody can squat another payer's id,
       and a key is never reused, so an old release voucher can never pay out on a new escrow.
     - Every amount a caller names is CUMULATIVE ("the payee has been paid X in total"), so a
       retried release or claim is a no-op instead of a second payment.
     - Nothing is pushed: every payout is credited and the owner pulls it with withdraw(), so a
       payee that reverts on receipt blocks only itself.
     - Reverts carry short stable reasons ("not_found", "disputed", ...) that the Python client
       maps to clawnode error codes.
"""

UNSET: constant(uint8) = 0
ACTIVE: constant(uint8) = 1
DISPUTED: constant(uint8) = 2
CLOSED: constant(uint8) = 3

struct Escrow:
    payee: address
    arbiter: address
    amount: uint256
    released: uint256
    deadline: uint256
    window: uint256
    state: uint8

event Locked:
    key: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    amount: uint256
    deadline: uint256
    window: uint256

event Released:
    key: indexed(bytes32)
    paid: uint256
    released: uint256

event Refunded:
    key: indexed(bytes32)
    amount: uint256

event Disputed:
    key: indexed(bytes32)
    by: indexed(address)

event Resolved:
    key: indexed(bytes32)
    to_payee: uint256
    to_payer: uint256

event Withdrawn:
    owner: indexed(address)
    to: indexed(address)
    amount: uint256

escrows: public(HashMap[bytes32, Escrow])
credit: public(HashMap[address, uint256])


@pure
@external
def escrow_key(payer: address, id: bytes32) -> bytes32:
    return keccak256(abi_encode(payer, id))


@view
@external
def voucher_hash(payer: address, id: bytes32, cumulative: uint256) -> bytes32:
    """
    @notice The EIP-191 (personal_sign) digest a payer signs to let the payee claim `cumulative`.
    """
    return self._voucher_hash(keccak256(abi_encode(payer, id)), cumulative)


@view
@internal
def _voucher_hash(key: bytes32, cumulative: uint256) -> bytes32:
    inner: bytes32 = keccak256(abi_encode(chain.id, self, key, cumulative))
    return keccak256(concat(b"\x19Ethereum Signed Message:\n32", inner))


@payable
@external
def lock(id: bytes32, payee: address, arbiter: address, deadline: uint256, window: uint256):
    key: bytes32 = keccak256(abi_encode(msg.sender, id))
    assert self.escrows[key].state == UNSET, "exists"
    assert msg.value > 0, "bad_amount"
    assert payee != empty(address) and arbiter != empty(address), "bad_party"
    assert payee != msg.sender and arbiter != msg.sender and arbiter != payee, "bad_party"
    assert deadline > block.timestamp, "bad_deadline"
    self.escrows[key] = Escrow(
        payee=payee, arbiter=arbiter, amount=msg.value, released=0, deadline=deadline, window=window, state=ACTIVE
    )
    log Locked(key=key, payer=msg.sender, payee=payee, amount=msg.value, deadline=deadline, window=window)


@internal
def _pay_to(key: bytes32, cumulative: uint256):
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert e.state != DISPUTED, "disputed"
    assert e.state == ACTIVE, "closed"
    assert cumulative <= e.amount, "exceeds_locked"
    assert cumulative > e.released, "already_released"
    paid: uint256 = cumulative - e.released
    self.escrows[key].released = cumulative
    self.credit[e.payee] += paid
    if cumulative == e.amount:
        self.escrows[key].state = CLOSED
    log Released(key=key, paid=paid, released=cumulative)


@external
def release(id: bytes32, cumulative: uint256):
    """
    @notice The payer raises the payee's total to `cumulative`.
    """
    self._pay_to(keccak256(abi_encode(msg.sender, id)), cumulative)


@external
def claim(payer: address, id: bytes32, cumulative: uint256, signature: Bytes[65]):
    """
    @notice Anyone (usually the payee) raises the payee's total to `cumulative` with the payer's
            signature over voucher_hash(payer, id, cumulative).
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    assert self.escrows[key].state != UNSET, "not_found"
    assert len(signature) == 65, "bad_signature"
    r: bytes32 = extract32(signature, 0)
    s: bytes32 = extract32(signature, 32)
    v: uint8 = convert(slice(signature, 64, 1), uint8)
    if v < 27:
        v += 27
    # Reject high-s (malleable) signatures as ecrecover accepts both forms.
    assert convert(s, uint256) <= 57896044618658097711785492504343953926418782139537452191302581570759080747168, "bad_signature"
    signer: address = ecrecover(self._voucher_hash(key, cumulative), v, r, s)
    assert signer != empty(address) and signer == payer, "bad_signature"
    self._pay_to(key, cumulative)


@external
def refund(payer: address, id: bytes32):
    """
    @notice After deadline + window, what was not released goes back to the payer (anyone may call).
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert e.state != DISPUTED, "disputed"
    assert e.state == ACTIVE, "closed"
    assert block.timestamp > e.deadline + e.window, "too_early"
    rest: uint256 = e.amount - e.released
    self.escrows[key].state = CLOSED
    self.credit[payer] += rest
    log Refunded(key=key, amount=rest)


@external
def dispute(payer: address, id: bytes32):
    """
    @notice Payer or payee freezes the escrow until the arbiter resolves it; only until deadline + window.
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert msg.sender == payer or msg.sender == e.payee, "forbidden"
    assert e.state != DISPUTED, "disputed"
    assert e.state == ACTIVE, "closed"
    assert block.timestamp <= e.deadline + e.window, "window_closed"
    self.escrows[key].state = DISPUTED
    log Disputed(key=key, by=msg.sender)


@external
def resolve(payer: address, id: bytes32, to_payee: uint256):
    """
    @notice The arbiter splits what is left of a disputed escrow: `to_payee` to the payee, the rest to the payer.
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert msg.sender == e.arbiter, "forbidden"
    assert e.state == DISPUTED, "not_disputed"
    rest: uint256 = e.amount - e.released
    assert to_payee <= rest, "exceeds_locked"
    self.escrows[key].released = e.released + to_payee
    self.escrows[key].state = CLOSED
    self.credit[e.payee] += to_payee
    self.credit[payer] += rest - to_payee
    log Resolved(key=key, to_payee=to_payee, to_payer=rest - to_payee)


@nonreentrant
@external
def withdraw(to: address) -> uint256:
    """
    @notice Pay out everything credited to the caller, to `to` (the caller itself, or another
            address when the caller cannot receive coin).
    """
    amount: uint256 = self.credit[msg.sender]
    assert amount > 0, "nothing_to_withdraw"
    assert to != empty(address), "bad_party"
    self.credit[msg.sender] = 0
    raw_call(to, b"", value=amount)
    log Withdrawn(owner=msg.sender, to=to, amount=amount)
    return amount
