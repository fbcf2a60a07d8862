// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

interface IDepositContract {
    function deposit(
        bytes calldata pubkey,
        bytes calldata withdrawal_credentials,
        bytes calldata signature,
        bytes32 deposit_data_root
    ) external payable;
}

/// @title Several validator deposits in one transaction
/// @notice Calls the deposit contract once per entry; the entries' byte fields come
/// concatenated (48-byte pubkeys, 32-byte credentials, 96-byte signatures) and the value
/// must be exactly the sum of the amounts. Any failing deposit reverts the whole batch.
contract BatchDeposit {
    IDepositContract public immutable depositContract;

    constructor(address deposit_contract) {
        depositContract = IDepositContract(deposit_contract);
    }

    function batchDeposit(
        bytes calldata pubkeys,
        bytes calldata withdrawal_credentials,
        bytes calldata signatures,
        bytes32[] calldata deposit_data_roots,
        uint64[] calldata amounts_gwei
    ) external payable {
        uint256 n = deposit_data_roots.length;
        require(n >= 1 && amounts_gwei.length == n, "BatchDeposit: entry counts differ");
        require(
            pubkeys.length == n * 48 && withdrawal_credentials.length == n * 32
                && signatures.length == n * 96,
            "BatchDeposit: field lengths do not match the entry count"
        );
        uint256 total = 0;
        for (uint256 i = 0; i < n; i++) {
            total += uint256(amounts_gwei[i]) * 1 gwei;
        }
        require(msg.value == total, "BatchDeposit: value is not the sum of the amounts");
        for (uint256 i = 0; i < n; i++) {
            depositContract.deposit{value: uint256(amounts_gwei[i]) * 1 gwei}(
                pubkeys[i * 48:(i + 1) * 48],
                withdrawal_credentials[i * 32:(i + 1) * 32],
                signatures[i * 96:(i + 1) * 96],
                deposit_data_roots[i]
            );
        }
    }
}
