// Sends messages through relaymail with nodemailer's pooled SMTP transport
// (Debian's node-nodemailer): argv[2] is a JSON object with port, ca (PEM
// file), user, password, count and connections.  Prints one JSON object:
// each message's response line, or the error that ended the run.  The
// last message has UTF-8 addresses.
"use strict";
const fs = require("fs");
const nodemailer = require("nodemailer");

const options = JSON.parse(process.argv[2]);
const transport = nodemailer.createTransport({
    pool: true,
    maxConnections: options.connections,
    maxMessages: 100,
    host: "127.0.0.1",
    port: options.port,
    secure: false,
    requireTLS: true,
    name: "nodemailer.test",
    tls: {ca: [fs.readFileSync(options.ca)]},
    auth: {user: options.user, pass: options.password},
});

const sends = [];
for (let i = 0; i < options.count; i++) {
    sends.push(transport.sendMail({
        from: "app@example.org",
        to: [`one${i}@example.net`, `two${i}@example.com`],
        subject: `pooled ${i}`,
        text: `message ${i} from the pool\nGrüße\n`,
    }).then((info) => ({response: info.response, accepted: info.accepted})));
}
// One more, international: nodemailer asks for SMTPUTF8 itself (RFC 6531).
sends.push(transport.sendMail({
    from: "rené@exämple.org",
    to: "jürgen@example.com",
    subject: "grüße",
    text: "Grüße\n",
}).then((info) => ({response: info.response, accepted: info.accepted})));
Promise.all(sends).then((results) => {
    transport.close();
    console.log(JSON.stringify({results}));
}, (error) => {
    transport.close();
    console.log(JSON.stringify({error: String(error)}));
    process.exitCode = 1;
});
