"""The network profile's parts (issue 20): who can pay whom, private chain ids, the dev chain's JSON-RPC door."""

from __future__ import annotations

import json
import socket
from typing import Any

import httpx
import pytest
import trio
from eth_account import Account

from bootstrap.network import NetworkProfile, peer_of, reachable_url
from protocols.machines.payable import PaymentNetwork, ProviderTerms, caip2, payable_verdict, unpayable_summary
from runtime.errors import ClawnodeError, ErrorCode
from runtime.escrow import Chain, EscrowClient
from runtime.escrow.devchain import (
    FAUCET_AMOUNT,
    KNOWN_ACCOUNT_KEEP,
    MAX_CALL_GAS,
    MAX_RPC_BODY,
    MAX_SEND_GAS,
    DevChain,
    answer_rpc,
)
from runtime.escrow.errors import EscrowError
from runtime.escrow.fees import gas_share_refusal

CONTRACT = "0x" + "ab" * 20
OTHER = "0x" + "cd" * 20


@pytest.mark.parametrize(
    ("ours", "theirs", "reason"),
    [
        (PaymentNetwork("eip155:7", CONTRACT), ProviderTerms("eip155:7", CONTRACT.upper().replace("0X", "0x")), None),
        (PaymentNetwork("eip155:7", CONTRACT), ProviderTerms("eip155:8", CONTRACT), "other_chain"),
        (PaymentNetwork("eip155:7", CONTRACT), ProviderTerms("eip155:7", OTHER), "other_contract"),
        # Only positive knowledge refuses: a record naming no escrow, or our chain not connected yet.
        (PaymentNetwork("eip155:7", CONTRACT), ProviderTerms(None, None), None),
        (None, ProviderTerms("eip155:8", OTHER), None),
    ],
)
def test_payable_verdict(ours: PaymentNetwork | None, theirs: ProviderTerms, reason: str | None) -> None:
    verdict = payable_verdict(ours, theirs)
    assert (verdict.reason if verdict else None) == reason
    if verdict is not None:
        assert verdict.code == ErrorCode.UNAVAILABLE


def test_unpayable_summary_counts_by_reason() -> None:
    assert unpayable_summary([]) is None
    assert unpayable_summary(["other_chain"] * 3) == "3 providers on other chains"
    assert unpayable_summary(["other_chain", "other_contract"]) == (
        "1 provider on other chains, 1 provider on other escrow contracts"
    )


def test_private_chains_never_share_an_id_and_sign_with_their_own() -> None:
    first, second = DevChain.start(), DevChain.start()
    assert first.chain.chain_id != second.chain.chain_id
    assert first.chain.chain_id >= 2**32 and int(first.chain.w3.eth.chain_id) == first.chain.chain_id
    # eth-tester's deploy is deterministic: same contract address on both, so only the chain id tells them apart.
    assert first.deployer.address == second.deployer.address
    wallet = Account.create()
    assert first.fund(wallet.address) and not first.fund(wallet.address)  # once per wallet
    payer = first.deployer.for_account(wallet)
    payee, arbiter = first.chain.dev_accounts()[2:4]
    lock = payer.lock(
        b"\x01" * 32,
        payee=payee.address,
        arbiter=arbiter.address,
        amount=10**9,
        deadline=first.chain.now() + 600,
        window=5,
    )
    assert lock.gas_used > 0
    assert payer.get(wallet.address, b"\x01" * 32).amount == 10**9
    assert caip2(first.chain.chain_id) == f"eip155:{first.chain.chain_id}"


def _rpc(chain: Chain, method: str, params: list[Any] | None = None, **extra: Any) -> dict[str, Any]:
    body = {"jsonrpc": "2.0", "id": 7, "method": method, "params": params or [], **extra}
    return answer_rpc(chain, json.dumps(body).encode())


def test_the_dev_chain_answers_only_what_the_escrow_client_needs() -> None:
    dev = DevChain.start()
    chain = dev.chain
    assert _rpc(chain, "eth_chainId")["result"] == hex(chain.chain_id)
    for method in ("eth_sendTransaction", "eth_accounts", "evm_increaseTime", "evm_revert", "eth_sign", "debug_x"):
        assert _rpc(chain, method)["error"]["code"] == -32601, method
    assert answer_rpc(chain, b"[{}]")["error"]["code"] == -32600  # no batches
    assert answer_rpc(chain, b"{nope")["error"]["code"] == -32700
    assert _rpc(chain, "eth_blockNumber", [1, 2, 3, 4, 5])["error"]["code"] == -32602
    # A revert travels with the contract's reason, as a JSON-RPC chain sends it.
    refund = dev.deployer.contract.functions.refund(chain.dev_accounts()[0].address, b"\x02" * 32)
    tx = {"to": dev.deployer.address, "data": refund._encode_transaction_data(), "gas": hex(10**9)}
    reverted = _rpc(chain, "eth_call", [tx, "latest"])
    assert reverted["error"]["code"] == 3 and "not_found" in reverted["error"]["message"]


def test_the_dev_chain_keys_everyone_knows_hold_next_to_nothing() -> None:
    """eth-tester's funded accounts have the same keys in every process: whoever reaches the JSON-RPC
    endpoint could spend them, so the faucet's coin sits under a fresh key and they are left empty."""
    dev = DevChain.start()
    w3 = dev.chain.w3
    assert all(w3.eth.get_balance(account.address) == KNOWN_ACCOUNT_KEEP for account in dev.chain.dev_accounts())
    assert w3.eth.get_balance(dev.faucet.address) > 9 * 10**6 * 10**18  # nearly all of their 10**7 ETH
    assert dev.faucet.address not in {account.address for account in dev.chain.dev_accounts()}
    stranger = Account.create().address
    assert dev.fund(stranger) and w3.eth.get_balance(stranger) == FAUCET_AMOUNT
    assert not dev.fund(stranger)  # once per wallet


def test_a_sent_transaction_may_not_hold_the_chain_for_long() -> None:
    """A loop up to the block gas limit held the chain's one thread ~11 s per transaction."""
    dev = DevChain.start()
    w3 = dev.chain.w3
    sender = Account.create()
    dev.fund(sender.address)

    def raw(**fields: Any) -> str:
        tx = {"value": 1, "gasPrice": int(w3.eth.gas_price), "chainId": dev.chain.chain_id, "nonce": 0}
        return "0x" + bytes(sender.sign_transaction({**tx, **fields}).raw_transaction).hex()

    stranger = Account.create().address
    too_much = _rpc(dev.chain, "eth_sendRawTransaction", [raw(to=stranger, gas=MAX_SEND_GAS + 1)])
    assert too_much["error"]["code"] == -32602 and "gas limit" in too_much["error"]["message"]
    creation = _rpc(dev.chain, "eth_sendRawTransaction", [raw(data="0x00", gas=MAX_CALL_GAS + 1)])
    assert f"gas limit above {MAX_CALL_GAS}" in creation["error"]["message"]
    assert "undecodable" in _rpc(dev.chain, "eth_sendRawTransaction", ["0xzz"])["error"]["message"]
    assert w3.eth.get_transaction_count(sender.address) == 0  # none of them reached the chain
    assert "result" in _rpc(dev.chain, "eth_sendRawTransaction", [raw(to=stranger, gas=21_000)])
    assert w3.eth.get_balance(stranger) == 1


def test_eth_call_gas_is_capped() -> None:
    dev = DevChain.start()
    seen: list[Any] = []
    original = dev.chain.w3.manager.request_blocking

    def spy(method: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
        if method == "eth_call":
            seen.append(params)
        return original(method, params, *args, **kwargs)

    dev.chain.w3.manager.request_blocking = spy  # type: ignore[method-assign]
    _rpc(dev.chain, "eth_call", [{"to": dev.deployer.address, "data": "0x", "gas": hex(10**12)}, "latest"])
    assert int(seen[-1][0]["gas"], 16) == MAX_CALL_GAS


async def test_the_served_chain_refuses_big_bodies_and_other_verbs_and_serves_a_web3_client() -> None:
    dev = await trio.to_thread.run_sync(DevChain.start)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(dev.serve, "127.0.0.1", 0)
        assert url.startswith("http://127.0.0.1:")

        def probe() -> None:
            with httpx.Client(timeout=10) as client:
                assert client.get(url).status_code == 405
                assert client.post(url, content=b"x" * (MAX_RPC_BODY + 1)).status_code == 413
            # A web3 client over HTTP sees the chain, the escrow and its state as the node does.
            remote = Chain.rpc(url)
            assert remote.chain_id == dev.chain.chain_id
            reader = EscrowClient(remote, remote.dev_accounts()[0], dev.deployer.address)
            reader.verify_contract()
            assert reader.get(dev.chain.dev_accounts()[0].address, b"\x03" * 32).phase == "none"

        await trio.to_thread.run_sync(probe)
        nursery.cancel_scope.cancel()


def test_profiles_name_their_chain_and_urls_reachable_from_the_joiner() -> None:
    profile = NetworkProfile(chain="eip155:1234567890123", contract=CONTRACT, rpc_urls=["http://0.0.0.0:8545"])
    assert profile.chain_id == 1234567890123
    assert NetworkProfile(chain="solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", contract=CONTRACT).chain_id is None
    assert reachable_url("http://0.0.0.0:8545", "192.168.1.4") == "http://192.168.1.4:8545"
    assert reachable_url("http://127.0.0.1:8545", "192.168.1.4") == "http://127.0.0.1:8545"
    assert reachable_url("http://[::]:8545", "fe80::1") == "http://[fe80::1]:8545"
    with pytest.raises(ValueError):
        NetworkProfile(chain="eip155:1", contract=CONTRACT, rpc_urls=["file:///etc/passwd"])
    peer = "12D3KooWRGkfSrypHaoQxJNTqZM6PGuxJFgmYDsxenCPAMG3MzKq"
    parsed = peer_of(f"/ip4/10.0.0.2/tcp/4020/p2p/{peer}")
    assert parsed is not None and str(parsed[0]) == peer and parsed[1] == "10.0.0.2"
    assert peer_of("/ip4/10.0.0.2/tcp/4020") is None


def test_a_lock_not_worth_its_gas_is_refused_before_anything_is_sent() -> None:
    assert gas_share_refusal(amount=10**9, gas_price=10**9, max_share=0) is None  # no limit: the default
    assert gas_share_refusal(amount=10**18, gas_price=10**9, max_share=0.01) is None
    refused = gas_share_refusal(amount=2_000 * 10**9, gas_price=5 * 10**7, max_share=0.01)  # 2,000 tokens at 1 gwei, L2
    assert refused is not None and refused[:2] == (ErrorCode.INVALID_ARGUMENT, "gas_share")
    assert "747.50%" in refused[2]  # 299k gas at 0.05 gwei: seven and a half times the lease's value

    dev = DevChain.start()
    wallet = Account.create()
    dev.fund(wallet.address)
    payer = dev.deployer.for_account(wallet)
    payer.max_gas_share = 0.01
    payee, arbiter = dev.chain.dev_accounts()[2:4]
    terms = {"payee": payee.address, "arbiter": arbiter.address, "deadline": dev.chain.now() + 600, "window": 5}
    nonce = dev.chain.w3.eth.get_transaction_count(wallet.address)
    with pytest.raises(EscrowError) as error:
        payer.lock(b"\x04" * 32, amount=10**12, **terms)  # type: ignore[arg-type]
    assert error.value.code == ErrorCode.INVALID_ARGUMENT and error.value.reason == "gas_share"
    assert dev.chain.w3.eth.get_transaction_count(wallet.address) == nonce  # nothing was sent
    payer.lock(b"\x05" * 32, amount=10**17, **terms)  # type: ignore[arg-type]  # 0.28 % of it: locked
    assert payer.get(wallet.address, b"\x05" * 32).amount == 10**17


async def test_a_taken_dev_rpc_port_is_named() -> None:
    dev = await trio.to_thread.run_sync(DevChain.start)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with trio.open_nursery() as nursery:
            with pytest.raises(ClawnodeError) as refused:
                await nursery.start(dev.serve, "127.0.0.1", port)
    assert refused.value.code == ErrorCode.UNAVAILABLE and "escrow.dev_rpc_listen" in refused.value.message


async def test_the_faucet_funds_a_bounded_number_of_wallets_a_minute(autojump_clock: trio.abc.Clock) -> None:
    """Fresh addresses cost a stranger nothing: without a rate one could take every grant in seconds."""
    from bootstrap.network import FundRequest, NetworkService
    from runtime.escrow.faucet import GRANTS_PER_WINDOW, WINDOW_S

    asked: list[str] = []

    async def faucet(address: str) -> bool:
        asked.append(address)
        return True

    service = NetworkService(host=None)  # type: ignore[arg-type]  # the handler never touches the host
    service.profile = NetworkProfile(chain="eip155:1234567890123", contract=CONTRACT, faucet=True)
    service.faucet = faucet

    def ask() -> bytes:
        return FundRequest(address=Account.create().address).model_dump_json().encode()

    for _ in range(GRANTS_PER_WINDOW):
        assert (await service._handle(ask(), None)).funded  # type: ignore[arg-type, attr-defined]
    with pytest.raises(ClawnodeError) as refused:
        await service._handle(ask(), None)  # type: ignore[arg-type]
    assert (refused.value.code, refused.value.reason) == (ErrorCode.RATE_LIMITED, "faucet_busy")
    assert len(asked) == GRANTS_PER_WINDOW  # the refused one never reached the chain
    await trio.sleep(WINDOW_S)
    assert (await service._handle(ask(), None)).funded  # type: ignore[arg-type, attr-defined]
