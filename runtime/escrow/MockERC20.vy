# pragma version 0.4.3
"""
@title clawnode mock ERC-20 (development chains and tests only)
@notice A plain ERC-20 whose `mint` is open to anyone: a stand-in stablecoin for a development
        network and the escrow's token tests. `set_fee` makes transfers burn a share of what they
        move (a fee-on-transfer token, which the escrow must refuse).
"""

from ethereum.ercs import IERC20

implements: IERC20

name: public(String[32])
symbol: public(String[8])
decimals: public(uint8)
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
fee_bps: public(uint256)


@deploy
def __init__():
    self.name = "clawnode test dollar"
    self.symbol = "cUSD"
    self.decimals = 6


@internal
def _move(source: address, to: address, amount: uint256):
    assert to != empty(address), "bad_party"
    self.balanceOf[source] -= amount
    fee: uint256 = amount * self.fee_bps // 10000
    self.balanceOf[to] += amount - fee
    self.totalSupply -= fee
    log IERC20.Transfer(sender=source, receiver=to, value=amount - fee)


@external
def transfer(to: address, amount: uint256) -> bool:
    self._move(msg.sender, to, amount)
    return True


@external
def transferFrom(source: address, to: address, amount: uint256) -> bool:
    self.allowance[source][msg.sender] -= amount
    self._move(source, to, amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log IERC20.Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def mint(to: address, amount: uint256):
    self.balanceOf[to] += amount
    self.totalSupply += amount
    log IERC20.Transfer(sender=empty(address), receiver=to, value=amount)


@external
def set_fee(bps: uint256):
    assert bps <= 10000, "bad_amount"
    self.fee_bps = bps
