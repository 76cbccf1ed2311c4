//! `cnpc schema`: a JSON Schema of the three policy kinds, for editors (yaml-language-server).
//!
//! The rule types' schemas come from the AST itself (schemars derives them from the same
//! structs the decoder fills), so the schema and the checker cannot drift apart.

use crate::ast::{NetworkPolicySpec, ObjectMeta, PolicyKind, Rule};
use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

/// One schema accepting any of the three kinds, discriminated by `kind`.
pub fn policy_schema() -> Value {
    let mut generator = SchemaSettings::draft07().into_generator();
    let rule = generator.subschema_for::<Rule>();
    let np_spec = generator.subschema_for::<NetworkPolicySpec>();
    let meta = generator.subschema_for::<ObjectMeta>();
    let defs = generator.take_definitions(true);
    let object = |kind: PolicyKind, spec: Value| {
        let mut props = json!({
            "apiVersion": {"const": kind.api_version()},
            "kind": {"const": kind.as_str()},
            "metadata": meta,
            "spec": spec,
            "status": {"description": "written by controllers; ignored"},
        });
        if kind != PolicyKind::NetworkPolicy {
            props["specs"] = json!({"type": "array", "items": rule});
        }
        json!({
            "title": kind.as_str(),
            "type": "object",
            "required": ["apiVersion", "kind", "metadata"],
            "properties": props,
            "additionalProperties": false,
        })
    };
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": "https://cnpc.dev/schema/policy.json",
        "title": "Kubernetes and Cilium network policy",
        "description": "CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and networking.k8s.io/v1 NetworkPolicy, as cnpc checks them",
        "oneOf": [
            object(PolicyKind::CiliumNetworkPolicy, rule.clone().into()),
            object(PolicyKind::CiliumClusterwideNetworkPolicy, rule.clone().into()),
            object(PolicyKind::NetworkPolicy, np_spec.into()),
        ],
        "definitions": defs,
    })
}

/// `cnpc schema --expectations`: the JSON Schema of a `cnpc test` expectations file (see
/// [`crate::expect`]). Written by hand beside the reader, which checks the same things and more
/// (that names exist in the cluster snapshot); a test holds the two together.
pub fn expectations_schema() -> Value {
    let label_map = json!({
        "type": "object",
        "additionalProperties": {"type": ["string", "number", "boolean"]},
    });
    let peer_string = json!({
        "type": "string",
        "pattern": "^(pod|labels|ip|fqdn|entity):.+",
        "description": "A peer of `cnpc trace`: pod:NAMESPACE/NAME (a pod, or a workload by its controller's name), labels:NAMESPACE:key=value,..., ip:ADDRESS, fqdn:NAME=ADDRESS or entity:NAME",
    });
    let workloads = json!({
        "type": "object",
        "description": "Every workload of the cluster snapshot in `namespace` (all namespaces without it) whose pod labels match `labels`",
        "required": ["workloads"],
        "additionalProperties": false,
        "properties": {
            "workloads": {
                "type": ["object", "null"],
                "additionalProperties": false,
                "properties": {
                    "namespace": {"type": "string", "minLength": 1},
                    "labels": label_map,
                },
            },
        },
    });
    let labels = json!({
        "type": "object",
        "description": "Every workload, in any namespace, whose pod labels match",
        "required": ["labels"],
        "additionalProperties": false,
        "properties": {"labels": label_map},
    });
    let port = json!({
        "oneOf": [
            {"type": "integer", "minimum": 0, "maximum": 65535},
            {
                "type": "string",
                // ECMA-262 has no inline case flag: each letter of a keyword in either case.
                "pattern": "^([Aa][Nn][Yy]|([Aa][Nn][Yy]|[0-9]+(-[0-9]+)?)(/([Tt][Cc][Pp]|[Uu][Dd][Pp]|[Ss][Cc][Tt][Pp]|[Ii][Cc][Mm][Pp]([Vv]6)?|[Aa][Nn][Yy]))?)$",
            },
        ],
        "description": "80 (TCP), 80/TCP, 8000-8080/UDP, any/TCP (every port), 53/ANY (TCP, UDP and SCTP), 8/ICMP (an ICMP type), or any (all traffic)",
    });
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$id": "https://cnpc.dev/schema/expectations.json",
        "title": "cnpc test expectations",
        "description": "Reachability expectations that `cnpc test PATHS --cluster FILE --expect FILE` checks against the policies",
        "type": "object",
        "required": ["cases"],
        "additionalProperties": false,
        "properties": {
            "cases": {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/case"}},
        },
        "definitions": {
            "peer": {"oneOf": [peer_string, workloads, labels]},
            "peers": {
                "oneOf": [
                    {"$ref": "#/definitions/peer"},
                    {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/peer"}},
                ],
            },
            "port": port,
            "case": {
                "type": "object",
                "required": ["from", "to", "port", "expect"],
                "additionalProperties": false,
                "not": {"required": ["http", "dns"]},
                "properties": {
                    "name": {"type": "string", "minLength": 1},
                    "from": {"$ref": "#/definitions/peers"},
                    "to": {"$ref": "#/definitions/peers"},
                    "port": {
                        "oneOf": [
                            {"$ref": "#/definitions/port"},
                            {"type": "array", "minItems": 1, "items": {"$ref": "#/definitions/port"}},
                        ],
                    },
                    "http": {
                        "type": "object",
                        "description": "An HTTP request judged against L7 rules",
                        "required": ["method", "path"],
                        "additionalProperties": false,
                        "properties": {
                            "method": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "minLength": 1},
                            "host": {"type": "string", "minLength": 1},
                            "headers": label_map,
                        },
                    },
                    "dns": {"type": "string", "minLength": 1, "description": "A DNS query name judged against DNS rules"},
                    "expect": {"enum": ["allowed", "denied"]},
                },
            },
        },
    })
}
