// A small application written for SAP BTP with the SAP Cloud SDK: it calls destinations by name.
// Nothing here is specific to the connector: the service bindings come from VCAP_SERVICES, the
// destinations from the destination service those bindings name, the on-premise systems are
// reached through the connectivity proxy, exactly as on SAP BTP.
//
//   node app.js '[{"destination": "erp-basic", "path": "/sap/opu/odata/x"},
//                 {"destination": "erp-principal", "path": "/sap/opu/odata/y", "jwt": "<user JWT>"}]'
//
// Each call prints one JSON line: {destination, status, data} or {destination, error}.
'use strict';

const { executeHttpRequest } = require('@sap-cloud-sdk/http-client');

function describe(error) {
  const messages = [];
  for (let e = error; e; e = e.cause) {
    messages.push(e.message);
    if (e.response) {
      messages.push(`HTTP ${e.response.status}: ${JSON.stringify(e.response.data)}`);
    }
  }
  return messages.join(' <- ');
}

async function call({ destination, path, jwt }) {
  // a user's token is passed as an application gets it from its caller (Authorization: Bearer ...)
  const target = jwt ? { destinationName: destination, jwt } : { destinationName: destination };
  try {
    const response = await executeHttpRequest(target, { method: 'get', url: path });
    return { destination, status: response.status, data: response.data };
  } catch (error) {
    return { destination, error: describe(error) };
  }
}

async function main() {
  const calls = JSON.parse(process.argv[2]);
  for (const request of calls) {
    console.log(JSON.stringify(await call(request)));
  }
}

main().catch(error => {
  console.error(describe(error));
  process.exit(1);
});
