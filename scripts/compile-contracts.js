#!/usr/bin/env node
// Compiles every contracts/*.sol with the project-local solc (npm `solc`, installed into
// .tools/ by scripts/setup.d/40-solc.sh) and writes contracts/build/<Name>.json:
// {"abi", "bytecode", "deployedBytecode"}. Deterministic: fixed optimizer settings, no
// metadata hash appended, stable key order.
//   node scripts/compile-contracts.js [outdir]
'use strict';
const fs = require('fs');
const path = require('path');

const root = path.resolve(__dirname, '..');
let solc;
try {
  solc = require(path.join(root, '.tools', 'node_modules', 'solc'));
} catch (e) {
  console.error('compile-contracts: solc is not installed; run scripts/setup.sh');
  process.exit(2);
}
const srcDir = path.join(root, 'contracts');
const outDir = path.resolve(process.argv[2] || path.join(srcDir, 'build'));

const sources = {};
for (const f of fs.readdirSync(srcDir).filter((f) => f.endsWith('.sol')).sort()) {
  sources[f] = { content: fs.readFileSync(path.join(srcDir, f), 'utf8') };
}
const input = {
  language: 'Solidity',
  sources,
  settings: {
    optimizer: { enabled: true, runs: 200 },
    evmVersion: 'cancun',
    metadata: { bytecodeHash: 'none', appendCBOR: false },
    outputSelection: { '*': { '*': ['abi', 'evm.bytecode.object', 'evm.deployedBytecode.object'] } },
  },
};
const out = JSON.parse(solc.compile(JSON.stringify(input)));
const errors = (out.errors || []).filter((e) => e.severity === 'error');
for (const e of out.errors || []) {
  console.error(e.formattedMessage);
}
if (errors.length > 0) {
  process.exit(1);
}
fs.mkdirSync(outDir, { recursive: true });
for (const file of Object.keys(out.contracts).sort()) {
  for (const name of Object.keys(out.contracts[file]).sort()) {
    const c = out.contracts[file][name];
    if (!c.evm.bytecode.object) {
      continue; // an interface
    }
    const json = {
      abi: c.abi,
      bytecode: '0x' + c.evm.bytecode.object,
      deployedBytecode: '0x' + c.evm.deployedBytecode.object,
    };
    fs.writeFileSync(path.join(outDir, name + '.json'), JSON.stringify(json, null, 2) + '\n');
  }
}
console.error(`compile-contracts: solc ${solc.version()} -> ${outDir}`);
