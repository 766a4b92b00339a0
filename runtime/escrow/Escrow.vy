# pragma version 0.4.3
"""
@title clawnode lease escrow (native coin or one ERC-20 token per escrow)
@notice A payer locks coin or tokens for a lease (or a payment channel of many leases); the payee
        is paid in parts; the rest goes back to the payer after deadline + dispute window; inside
        that window either party can freeze the escrow and only its arbiter (or m of its k panel
        arbiters, by signed votes) then splits it.
@dev Rules of this file:
     - An escrow is keyed by keccak256(abi_encode(payer, id)): nobody can squat another payer's id,
       and a key is never reused, so an old release voucher can never pay out on a new escrow.
     - Every amount a caller names is CUMULATIVE ("the payee has been paid X in total"), so a
       retried release or claim is a no-op instead of a second payment.
     - Nothing is pushed: every payout is credited and the owner pulls it with withdraw(), so a
       payee that reverts on receipt blocks only itself.
     - owed[token] is what the contract owes in that token (locked and not paid out, plus
       credited and not withdrawn); every intake asserts the contract holds at least that much.
     - Every state-changing entry point is @nonreentrant (one lock for all): a token's transferFrom
       or a withdraw's receiver cannot call back into any of them half-way.
     - Reverts carry short stable reasons ("not_found", "disputed", ...) that the Python client
       maps to clawnode error codes.
"""

from ethereum.ercs import IERC20

UNSET: constant(uint8) = 0
ACTIVE: constant(uint8) = 1
DISPUTED: constant(uint8) = 2
CLOSED: constant(uint8) = 3

MAX_PANEL: constant(uint256) = 5
# secp256k1's group order halved: higher s values are the malleable twins ecrecover also accepts.
HALF_N: constant(uint256) = 57896044618658097711785492504343953926418782139537452191302581570759080747168
PANEL_TAG: constant(bytes32) = keccak256("clawnode.escrow.panel_vote")

struct Escrow:
    payee: address
    arbiter: address
    amount: uint256
    released: uint256
    deadline: uint256
    window: uint256
    state: uint8
    token: address
    threshold: uint8

event Locked:
    key: indexed(bytes32)
    payer: indexed(address)
    payee: indexed(address)
    amount: uint256
    deadline: uint256
    window: uint256
    token: address

event PanelSet:
    key: indexed(bytes32)
    threshold: uint8
    panel: DynArray[address, MAX_PANEL]

event ToppedUp:
    key: indexed(bytes32)
    added: uint256
    amount: uint256
    deadline: uint256

event Released:
    key: indexed(bytes32)
    paid: uint256
    released: uint256

event Refunded:
    key: indexed(bytes32)
    amount: uint256

event Settled:
    key: indexed(bytes32)
    to_payee: uint256
    to_payer: uint256

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

event WithdrawnToken:
    owner: indexed(address)
    to: indexed(address)
    token: indexed(address)
    amount: uint256

escrows: public(HashMap[bytes32, Escrow])
# credit[owner][token]: what owner may withdraw in token (empty(address): the native coin).
credit: public(HashMap[address, HashMap[address, uint256]])
# owed[token]: everything the contract owes in token (still locked + credited, not withdrawn).
owed: public(HashMap[address, uint256])
panels: HashMap[bytes32, DynArray[address, MAX_PANEL]]


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
@external
def panel_vote_hash(payer: address, id: bytes32, to_payee: uint256) -> bytes32:
    """
    @notice The EIP-191 digest a panel arbiter signs to vote that the payee gets `to_payee` of what is left.
    """
    return self._panel_vote_hash(keccak256(abi_encode(payer, id)), to_payee)


@view
@external
def panel(payer: address, id: bytes32) -> DynArray[address, MAX_PANEL]:
    return self.panels[keccak256(abi_encode(payer, id))]


@view
@internal
def _voucher_hash(key: bytes32, cumulative: uint256) -> bytes32:
    inner: bytes32 = keccak256(abi_encode(chain.id, self, key, cumulative))
    return keccak256(concat(b"\x19Ethereum Signed Message:\n32", inner))


@view
@internal
def _panel_vote_hash(key: bytes32, to_payee: uint256) -> bytes32:
    inner: bytes32 = keccak256(abi_encode(PANEL_TAG, chain.id, self, key, to_payee))
    return keccak256(concat(b"\x19Ethereum Signed Message:\n32", inner))


@pure
@internal
def _signer(digest: bytes32, signature: Bytes[65]) -> address:
    """The signer of `digest`, refusing malformed and high-s (malleable) signatures."""
    assert len(signature) == 65, "bad_signature"
    r: bytes32 = extract32(signature, 0)
    s: bytes32 = extract32(signature, 32)
    v: uint8 = convert(slice(signature, 64, 1), uint8)
    if v < 27:
        v += 27
    assert convert(s, uint256) <= HALF_N, "bad_signature"
    signer: address = ecrecover(digest, v, r, s)
    assert signer != empty(address), "bad_signature"
    return signer


@internal
def _take(token: address, amount: uint256, sent: uint256):
    """Take `amount` of `token` from the caller (the coin: it came as msg.value, `sent`); owed grows by it."""
    assert amount > 0, "bad_amount"
    if token == empty(address):
        assert sent == amount, "bad_amount"
    else:
        assert sent == 0, "bad_amount"
        before: uint256 = staticcall IERC20(token).balanceOf(self)
        assert extcall IERC20(token).transferFrom(msg.sender, self, amount, default_return_value=True), "bad_token"
        # Exactly `amount` arrived (a fee-on-transfer or rebasing token would break every later sum).
        assert staticcall IERC20(token).balanceOf(self) == before + amount, "bad_token"
    self.owed[token] += amount
    if token == empty(address):
        assert self.balance >= self.owed[token], "bad_amount"
    else:
        assert staticcall IERC20(token).balanceOf(self) >= self.owed[token], "bad_token"


@internal
def _open(
    payer: address,
    id: bytes32,
    token: address,
    amount: uint256,
    sent: uint256,
    payee: address,
    arbiter: address,
    threshold: uint8,
    deadline: uint256,
    window: uint256,
) -> bytes32:
    key: bytes32 = keccak256(abi_encode(payer, id))
    assert self.escrows[key].state == UNSET, "exists"
    assert amount > 0, "bad_amount"
    assert payee != empty(address) and payee != payer, "bad_party"
    if threshold == 0:
        assert arbiter != empty(address), "bad_party"
        assert arbiter != payer and arbiter != payee, "bad_party"
    assert deadline > block.timestamp, "bad_deadline"
    self._take(token, amount, sent)
    self.escrows[key] = Escrow(
        payee=payee,
        arbiter=arbiter,
        amount=amount,
        released=0,
        deadline=deadline,
        window=window,
        state=ACTIVE,
        token=token,
        threshold=threshold,
    )
    log Locked(key=key, payer=payer, payee=payee, amount=amount, deadline=deadline, window=window, token=token)
    return key


@nonreentrant
@payable
@external
def lock(id: bytes32, payee: address, arbiter: address, deadline: uint256, window: uint256):
    """
    @notice Lock msg.value of the native coin under (msg.sender, id), decided by `arbiter` if disputed.
    """
    self._open(msg.sender, id, empty(address), msg.value, msg.value, payee, arbiter, 0, deadline, window)


@nonreentrant
@external
def lock_token(
    id: bytes32, token: address, amount: uint256, payee: address, arbiter: address, deadline: uint256, window: uint256
):
    """
    @notice Lock `amount` of the ERC-20 `token` (approved to this contract first) under (msg.sender, id).
    """
    assert token != empty(address), "bad_token"
    self._open(msg.sender, id, token, amount, 0, payee, arbiter, 0, deadline, window)


@nonreentrant
@payable
@external
def lock_panel(
    id: bytes32,
    token: address,
    amount: uint256,
    payee: address,
    panel: DynArray[address, MAX_PANEL],
    threshold: uint8,
    deadline: uint256,
    window: uint256,
):
    """
    @notice Lock like `lock`/`lock_token` (token empty: the coin, msg.value == amount), decided if
            disputed by `threshold` of the `panel` arbiters' signed votes (resolve_by_panel).
    """
    assert threshold >= 1 and convert(threshold, uint256) <= len(panel), "bad_panel"
    for i: uint256 in range(len(panel), bound=MAX_PANEL):
        member: address = panel[i]
        assert member != empty(address) and member != msg.sender and member != payee, "bad_panel"
        for j: uint256 in range(i, bound=MAX_PANEL):
            assert panel[j] != member, "bad_panel"
    key: bytes32 = self._open(msg.sender, id, token, amount, msg.value, payee, empty(address), threshold, deadline, window)
    self.panels[key] = panel
    log PanelSet(key=key, threshold=threshold, panel=panel)


@nonreentrant
@payable
@external
def top_up(id: bytes32, amount: uint256, deadline: uint256):
    """
    @notice The payer adds `amount` (0: none) to its open escrow and moves its deadline to `deadline`
            (never earlier); refused once disputed, closed, or past deadline + window.
    """
    key: bytes32 = keccak256(abi_encode(msg.sender, id))
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert e.state != DISPUTED, "disputed"
    assert e.state == ACTIVE, "closed"
    assert block.timestamp <= e.deadline + e.window, "window_closed"
    assert deadline >= e.deadline and deadline > block.timestamp, "bad_deadline"
    if amount == 0:
        assert msg.value == 0 and deadline > e.deadline, "bad_amount"
    else:
        self._take(e.token, amount, msg.value)
    self.escrows[key].amount = e.amount + amount
    self.escrows[key].deadline = deadline
    log ToppedUp(key=key, added=amount, amount=e.amount + amount, deadline=deadline)


@internal
def _pay_to(key: bytes32, cumulative: uint256, close_when_full: bool):
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert e.state != DISPUTED, "disputed"
    assert e.state == ACTIVE, "closed"
    assert cumulative <= e.amount, "exceeds_locked"
    assert cumulative > e.released, "already_released"
    paid: uint256 = cumulative - e.released
    self.escrows[key].released = cumulative
    self.credit[e.payee][e.token] += paid
    if close_when_full and cumulative == e.amount:
        self.escrows[key].state = CLOSED
    log Released(key=key, paid=paid, released=cumulative)


@internal
def _check_voucher(payer: address, key: bytes32, cumulative: uint256, signature: Bytes[65]):
    assert self.escrows[key].state != UNSET, "not_found"
    assert self._signer(self._voucher_hash(key, cumulative), signature) == payer, "bad_signature"


@nonreentrant
@external
def release(id: bytes32, cumulative: uint256):
    """
    @notice The payer raises the payee's total to `cumulative`.
    """
    self._pay_to(keccak256(abi_encode(msg.sender, id)), cumulative, True)


@nonreentrant
@external
def claim(payer: address, id: bytes32, cumulative: uint256, signature: Bytes[65]):
    """
    @notice Anyone (usually the payee) raises the payee's total to `cumulative` with the payer's
            signature over voucher_hash(payer, id, cumulative); the escrow closes once all is paid.
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    self._check_voucher(payer, key, cumulative, signature)
    self._pay_to(key, cumulative, True)


@nonreentrant
@external
def draw(payer: address, id: bytes32, cumulative: uint256, signature: Bytes[65]):
    """
    @notice As claim, but the escrow stays open when all is paid (a channel the payer may top up).
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    self._check_voucher(payer, key, cumulative, signature)
    self._pay_to(key, cumulative, False)


@nonreentrant
@external
def settle(payer: address, id: bytes32, cumulative: uint256, signature: Bytes[65]):
    """
    @notice The payee closes the escrow now: first raises its total to `cumulative` with the payer's
            voucher (when above what was released), then everything still locked goes to the payer.
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert msg.sender == e.payee, "forbidden"
    if cumulative > e.released:
        self._check_voucher(payer, key, cumulative, signature)
        self._pay_to(key, cumulative, False)
    else:
        assert e.state != DISPUTED, "disputed"
        assert e.state == ACTIVE, "closed"
    released: uint256 = self.escrows[key].released
    rest: uint256 = e.amount - released
    self.escrows[key].state = CLOSED
    self.credit[payer][e.token] += rest
    log Settled(key=key, to_payee=released, to_payer=rest)


@nonreentrant
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
    self.credit[payer][e.token] += rest
    log Refunded(key=key, amount=rest)


@nonreentrant
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


@internal
def _split(payer: address, key: bytes32, e: Escrow, to_payee: uint256):
    assert e.state == DISPUTED, "not_disputed"
    rest: uint256 = e.amount - e.released
    assert to_payee <= rest, "exceeds_locked"
    self.escrows[key].released = e.released + to_payee
    self.escrows[key].state = CLOSED
    self.credit[e.payee][e.token] += to_payee
    self.credit[payer][e.token] += rest - to_payee
    log Resolved(key=key, to_payee=to_payee, to_payer=rest - to_payee)


@nonreentrant
@external
def resolve(payer: address, id: bytes32, to_payee: uint256):
    """
    @notice The arbiter splits what is left of a disputed escrow: `to_payee` to the payee, the rest to the payer.
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert msg.sender == e.arbiter, "forbidden"
    self._split(payer, key, e, to_payee)


@nonreentrant
@external
def resolve_by_panel(payer: address, id: bytes32, to_payee: uint256, signatures: DynArray[Bytes[65], MAX_PANEL]):
    """
    @notice Anyone splits a disputed panel escrow as `to_payee` with the signed votes
            (panel_vote_hash) of at least `threshold` distinct panel arbiters for that split.
    """
    key: bytes32 = keccak256(abi_encode(payer, id))
    e: Escrow = self.escrows[key]
    assert e.state != UNSET, "not_found"
    assert e.threshold > 0, "no_panel"
    assert e.state == DISPUTED, "not_disputed"
    assert to_payee <= e.amount - e.released, "exceeds_locked"
    members: DynArray[address, MAX_PANEL] = self.panels[key]
    digest: bytes32 = self._panel_vote_hash(key, to_payee)
    seen: DynArray[address, MAX_PANEL] = []
    for signature: Bytes[65] in signatures:
        signer: address = self._signer(digest, signature)
        assert signer in members, "bad_signature"
        assert signer not in seen, "duplicate_vote"
        seen.append(signer)
    assert len(seen) >= convert(e.threshold, uint256), "too_few_votes"
    self._split(payer, key, e, to_payee)


@internal
def _withdraw(token: address, to: address) -> uint256:
    amount: uint256 = self.credit[msg.sender][token]
    assert amount > 0, "nothing_to_withdraw"
    assert to != empty(address), "bad_party"
    self.credit[msg.sender][token] = 0
    self.owed[token] -= amount
    return amount


@nonreentrant
@external
def withdraw(to: address) -> uint256:
    """
    @notice Pay out all the native coin credited to the caller, to `to` (the caller itself, or
            another address when the caller cannot receive coin).
    """
    amount: uint256 = self._withdraw(empty(address), to)
    raw_call(to, b"", value=amount)
    log Withdrawn(owner=msg.sender, to=to, amount=amount)
    return amount


@nonreentrant
@external
def withdraw_token(token: address, to: address) -> uint256:
    """
    @notice Pay out all of `token` credited to the caller, to `to`.
    """
    assert token != empty(address), "bad_token"
    amount: uint256 = self._withdraw(token, to)
    assert extcall IERC20(token).transfer(to, amount, default_return_value=True), "bad_token"
    log WithdrawnToken(owner=msg.sender, to=to, token=token, amount=amount)
    return amount
