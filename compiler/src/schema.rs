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
