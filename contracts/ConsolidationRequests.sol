// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title EIP-7251 consolidation requests (the request contract's behaviour)
/// @notice Written from the EIP's specification for chains that lack the system contract
/// (anvil's Prague); installed at 0x0000BBdDc7CE488642fb579F8B00f3a590007251.
/// - Empty input, no value: returns the current fee (32-byte uint256).
/// - 96 bytes (source pubkey ++ target pubkey) with a value of at least the fee: queues the
///   request and logs source address(20) ++ input(96) (LOG0, 116 bytes).
/// - From the system address: dequeues up to MAX_PER_BLOCK requests, returned as
///   source(20) ++ source pubkey(48) ++ target pubkey(48) each, and updates the excess.
/// - Anything else reverts.
contract ConsolidationRequests {
    address private constant SYSTEM_ADDRESS = 0xffffFFFfFFffffffffffffffFfFFFfffFFFfFFfE;
    uint256 private constant EXCESS_INHIBITOR = type(uint256).max;
    uint256 private constant MIN_FEE = 1;
    uint256 private constant FEE_UPDATE_FRACTION = 17;
    uint256 private constant MAX_PER_BLOCK = 2;
    uint256 private constant TARGET_PER_BLOCK = 1;

    struct Request {
        address source;
        bytes32 a;
        bytes32 b;
        bytes32 c;
    }

    uint256 private excess;
    uint256 private count;
    uint256 private head;
    uint256 private tail;
    mapping(uint256 => Request) private queue;

    fallback(bytes calldata input) external payable returns (bytes memory) {
        if (msg.sender == SYSTEM_ADDRESS) {
            return dequeue();
        }
        if (input.length == 0) {
            require(msg.value == 0, "ConsolidationRequests: a fee read carries no value");
            return abi.encode(fee());
        }
        require(input.length == 96, "ConsolidationRequests: input must be source(48) ++ target(48)");
        require(msg.value >= fee(), "ConsolidationRequests: value below the fee");
        count += 1;
        queue[tail] = Request({
            source: msg.sender,
            a: bytes32(input[0:32]),
            b: bytes32(input[32:64]),
            c: bytes32(input[64:96])
        });
        tail += 1;
        bytes memory entry = abi.encodePacked(msg.sender, input);
        assembly {
            log0(add(entry, 32), mload(entry))
        }
        return "";
    }

    function fee() private view returns (uint256) {
        require(excess != EXCESS_INHIBITOR, "ConsolidationRequests: not active yet");
        return fakeExponential(MIN_FEE, excess, FEE_UPDATE_FRACTION);
    }

    function dequeue() private returns (bytes memory out) {
        uint256 n = tail - head;
        if (n > MAX_PER_BLOCK) {
            n = MAX_PER_BLOCK;
        }
        for (uint256 i = 0; i < n; i++) {
            Request storage r = queue[head + i];
            out = abi.encodePacked(out, r.source, r.a, r.b, r.c);
            delete queue[head + i];
        }
        head += n;
        if (head == tail) {
            head = 0;
            tail = 0;
        }
        uint256 previous = excess == EXCESS_INHIBITOR ? 0 : excess;
        excess = previous + count > TARGET_PER_BLOCK ? previous + count - TARGET_PER_BLOCK : 0;
        count = 0;
    }

    function fakeExponential(uint256 factor, uint256 numerator, uint256 denominator)
        private
        pure
        returns (uint256)
    {
        uint256 i = 1;
        uint256 output = 0;
        uint256 acc = factor * denominator;
        while (acc > 0) {
            output += acc;
            acc = (acc * numerator) / (denominator * i);
            i += 1;
        }
        return output / denominator;
    }
}
