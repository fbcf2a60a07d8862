// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

/// @title Validator deposit contract
/// @notice The on-chain part of a validator deposit, as the consensus specifications
/// describe the deposit contract: field lengths, the amount rules (at least 1 ETH, whole
/// gwei, fits in 64 bits), the recomputed `deposit_data_root` (SSZ hash tree root of the
/// DepositData), the `DepositEvent` log (amount and index as 8-byte little-endian), and the
/// incremental Merkle tree of depth 32 whose root the beacon chain follows.
/// @dev No state is set by a constructor (the zero hashes are computed when the root is
/// read), so the runtime code works whether deployed by a transaction or installed as code.
contract DepositContract {
    uint256 private constant DEPTH = 32;
    uint256 private constant MAX_DEPOSIT_COUNT = 2 ** DEPTH - 1;

    bytes32[DEPTH] private branch;
    uint256 private depositCount;

    event DepositEvent(
        bytes pubkey,
        bytes withdrawal_credentials,
        bytes amount,
        bytes signature,
        bytes index
    );

    /// @notice The root of the deposit tree, mixed in with the count (as the spec does).
    function get_deposit_root() external view returns (bytes32) {
        bytes32[DEPTH] memory zero;
        for (uint256 h = 0; h + 1 < DEPTH; h++) {
            zero[h + 1] = sha256(abi.encodePacked(zero[h], zero[h]));
        }
        bytes32 node;
        uint256 size = depositCount;
        for (uint256 h = 0; h < DEPTH; h++) {
            if ((size & 1) == 1) {
                node = sha256(abi.encodePacked(branch[h], node));
            } else {
                node = sha256(abi.encodePacked(node, zero[h]));
            }
            size /= 2;
        }
        return sha256(abi.encodePacked(node, littleEndian64(uint64(depositCount)), bytes24(0)));
    }

    /// @notice How many deposits were made, as 8-byte little-endian.
    function get_deposit_count() external view returns (bytes memory) {
        return littleEndian64(uint64(depositCount));
    }

    /// @notice Deposits `msg.value` for the validator `pubkey`.
    function deposit(
        bytes calldata pubkey,
        bytes calldata withdrawal_credentials,
        bytes calldata signature,
        bytes32 deposit_data_root
    ) external payable {
        require(pubkey.length == 48, "DepositContract: invalid pubkey length");
        require(
            withdrawal_credentials.length == 32,
            "DepositContract: invalid withdrawal_credentials length"
        );
        require(signature.length == 96, "DepositContract: invalid signature length");
        require(msg.value >= 1 ether, "DepositContract: deposit value too low");
        require(msg.value % 1 gwei == 0, "DepositContract: deposit value not multiple of gwei");
        uint256 gweiAmount = msg.value / 1 gwei;
        require(gweiAmount <= type(uint64).max, "DepositContract: deposit value too high");
        require(depositCount < MAX_DEPOSIT_COUNT, "DepositContract: merkle tree full");

        bytes memory amount = littleEndian64(uint64(gweiAmount));
        emit DepositEvent(
            pubkey,
            withdrawal_credentials,
            amount,
            signature,
            littleEndian64(uint64(depositCount))
        );

        // hash_tree_root(DepositData): pubkey (2 chunks), credentials, amount, signature (4).
        bytes32 pubkeyRoot = sha256(abi.encodePacked(pubkey, bytes16(0)));
        bytes32 signatureRoot = sha256(
            abi.encodePacked(
                sha256(abi.encodePacked(signature[:64])),
                sha256(abi.encodePacked(signature[64:], bytes32(0)))
            )
        );
        bytes32 node = sha256(
            abi.encodePacked(
                sha256(abi.encodePacked(pubkeyRoot, withdrawal_credentials)),
                sha256(abi.encodePacked(amount, bytes24(0), signatureRoot))
            )
        );
        require(
            node == deposit_data_root,
            "DepositContract: reconstructed DepositData does not match supplied deposit_data_root"
        );

        depositCount += 1;
        uint256 size = depositCount;
        for (uint256 h = 0; h < DEPTH; h++) {
            if ((size & 1) == 1) {
                branch[h] = node;
                return;
            }
            node = sha256(abi.encodePacked(branch[h], node));
            size /= 2;
        }
        // The tree has room for MAX_DEPOSIT_COUNT leaves; this is not reached.
        assert(false);
    }

    function littleEndian64(uint64 value) private pure returns (bytes memory out) {
        out = new bytes(8);
        bytes8 b = bytes8(value);
        for (uint256 i = 0; i < 8; i++) {
            out[i] = b[7 - i];
        }
    }
}
