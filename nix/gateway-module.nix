# services.cachepush-gateway: serve a private bucket to Nix clients.
#
# Secrets never enter the Nix store: the bucket credentials (an AWS shared-credentials
# file), the htpasswd file, the tokens file and the signing key are read by systemd with
# LoadCredential and handed to a service that runs as a dynamic user. Their options are
# strings ("/run/secrets/cache.sk"), never Nix paths: a path literal (./cache.sk) would be
# copied into the world-readable store at evaluation time, and an assertion refuses any
# value inside the store.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.cachepush-gateway;
  inherit (lib) mkOption mkEnableOption mkIf types;
  optionalFlag = flag: value: lib.optionals (value != null) [ flag value ];
  args = [ "gateway" "--from" cfg.from "--nar-delivery" cfg.narDelivery ]
    ++ lib.concatMap (l: [ "--listen" l ]) cfg.listen
    ++ optionalFlag "--htpasswd" (if cfg.htpasswdFile != null then "%d/htpasswd" else null)
    ++ optionalFlag "--tokens" (if cfg.tokensFile != null then "%d/tokens" else null)
    ++ optionalFlag "--signing-key" (if cfg.signingKeyFile != null then "%d/signing-key" else null)
    ++ lib.concatMap (k: [ "--require-signature-by" k ]) cfg.requireSignatureBy
    ++ lib.optional cfg.signUnverified "--sign-unverified"
    ++ lib.concatMap (i: [ "--push-oidc-issuer" i ]) cfg.push.oidcIssuers
    ++ optionalFlag "--push-oidc-audience" cfg.push.oidcAudience
    ++ lib.concatMap (c: [ "--push-claim" c ]) cfg.push.claims
    ++ optionalFlag "--push-quarantine-prefix" cfg.push.quarantinePrefix
    ++ lib.concatMap (c: [ "--push-quarantine-claim" c ]) cfg.push.quarantineClaims
    ++ lib.optional cfg.push.trustPushers "--trust-pushers"
    ++ cfg.extraArgs;
  pushing = cfg.push.oidcIssuers != [ ];
  secrets = {
    inherit (cfg) credentialsFile htpasswdFile tokensFile signingKeyFile;
  };
  inStore = f: f != null && lib.hasPrefix builtins.storeDir (toString f);
  credential = name: file: lib.optional (file != null) "${name}:${file}";
in
{
  options.services.cachepush-gateway = {
    enable = mkEnableOption "the cachepush gateway, which serves an S3 bucket as a Nix binary cache";

    package = mkOption {
      type = types.package;
      default = pkgs.cachepush;
      description = "The cachepush package (add the flake's overlay, or set this).";
    };

    from = mkOption {
      type = types.str;
      example = "s3://nix-cache?endpoint=https://s3.us-west-004.backblazeb2.com&region=us-west-004";
      description = "The cache to serve: a bucket in Nix's s3:// URL syntax, or a cache directory as file:///DIR (read only; the service user needs read access to it).";
    };

    listen = mkOption {
      type = types.listOf types.str;
      default = [ "127.0.0.1:8080" ];
      example = [ "[::]:8080" "unix:/run/cachepush-gateway/gateway.sock" ];
      description = "Addresses to listen on: IPv4, IPv6 or unix:PATH.";
    };

    narDelivery = mkOption {
      type = types.enum [ "redirect" "proxy" ];
      default = "redirect";
      description = "redirect: 307 to presigned URLs; proxy: stream NARs through the gateway.";
    };

    credentialsFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/cachepush-aws-credentials";
      description = ''
        An AWS shared-credentials file ([default] aws_access_key_id = ...) for the bucket.
        Read-only, bucket-scoped keys are enough. Null: the standard chain (e.g. an
        instance role).
      '';
    };

    htpasswdFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "htpasswd file with bcrypt entries (htpasswd -B) for HTTP Basic auth.";
    };

    tokensFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      description = "File of bearer tokens, one per line.";
    };

    signingKeyFile = mkOption {
      type = types.nullOr types.str;
      default = null;
      example = "/run/secrets/gateway.sk";
      description = ''
        Secret key whose signature the gateway adds to narinfos that a
        requireSignatureBy key signed (or to all, with signUnverified). A string, not a
        path literal, so that the key never enters the Nix store.
      '';
    };

    requireSignatureBy = mkOption {
      type = types.listOf types.str;
      default = [ ];
      example = [ "ci.example.org-1:BASE64..." ];
      description = "Public keys one of which must have validly signed a narinfo before the gateway signs it.";
    };

    signUnverified = mkOption {
      type = types.bool;
      default = false;
      description = ''
        Sign every narinfo in the bucket, signed or not. Anyone who can write to the
        bucket can then make clients install anything.
      '';
    };

    push = {
      oidcIssuers = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "https://token.actions.githubusercontent.com" ];
        description = ''
          Let CI jobs push with their identity tokens from these issuers (docs/keyless-ci.md).
          Needs signingKeyFile (the gateway signs what it publishes), oidcAudience and claims.
        '';
      };
      oidcAudience = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "https://cache.example.org";
        description = "The audience identity tokens must be minted for.";
      };
      claims = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "repository=my-org/*" "ref=refs/heads/main" ];
        description = "NAME=GLOB rules every pushing token must match.";
      };
      quarantinePrefix = mkOption {
        type = types.nullOr types.str;
        default = null;
        example = "quarantine";
        description = "Where tokens that fail the claims but match quarantineClaims push (unsigned).";
      };
      quarantineClaims = mkOption {
        type = types.listOf types.str;
        default = [ ];
        example = [ "repository=my-org/*" ];
        description = "NAME=GLOB rules a token must match to push into the quarantine.";
      };
      trustPushers = mkOption {
        type = types.bool;
        default = false;
        description = "Check uploads' size and FileHash only, not their NarHash.";
      };
    };

    extraArgs = mkOption {
      type = types.listOf types.str;
      default = [ ];
      description = "More arguments for cachepush gateway.";
    };
  };

  config = mkIf cfg.enable {
    assertions = lib.mapAttrsToList (name: f: {
      assertion = !(inStore f);
      message = "services.cachepush-gateway.${name} is in the Nix store, which every local user can read: give the path of a file outside it as a string, e.g. \"/run/secrets/${name}\".";
    }) secrets ++ [{
      assertion = cfg.signingKeyFile == null || cfg.requireSignatureBy != [ ] || cfg.signUnverified || pushing;
      message = "services.cachepush-gateway.signingKeyFile needs requireSignatureBy (the keys whose signature the gateway countersigns), signUnverified = true, or push.oidcIssuers.";
    } {
      assertion = !pushing || (cfg.signingKeyFile != null && cfg.push.oidcAudience != null && cfg.push.claims != [ ]);
      message = "services.cachepush-gateway.push.oidcIssuers needs signingKeyFile, push.oidcAudience and at least one push.claims rule.";
    }];

    systemd.services.cachepush-gateway = {
      description = "cachepush gateway";
      wantedBy = [ "multi-user.target" ];
      wants = [ "network-online.target" ];
      after = [ "network-online.target" ];
      environment = lib.optionalAttrs (cfg.credentialsFile != null) {
        AWS_SHARED_CREDENTIALS_FILE = "%d/aws-credentials";
        AWS_EC2_METADATA_DISABLED = "true";
      };
      serviceConfig = {
        ExecStart = lib.escapeShellArgs ([ "${cfg.package}/bin/cachepush" ] ++ args);
        # SIGHUP reloads the htpasswd and tokens files (it never stops the gateway).
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        LoadCredential = credential "aws-credentials" cfg.credentialsFile
          ++ credential "htpasswd" cfg.htpasswdFile
          ++ credential "tokens" cfg.tokensFile
          ++ credential "signing-key" cfg.signingKeyFile;
        DynamicUser = true;
        RuntimeDirectory = "cachepush-gateway";
        Restart = "on-failure";
        # Every client connection is a file descriptor (the gateway also raises its soft
        # limit to this hard one, and caps connections below it).
        LimitNOFILE = 65536;
        # Hardening: the gateway needs the network and nothing else.
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        NoNewPrivileges = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectControlGroups = true;
        RestrictAddressFamilies = [ "AF_INET" "AF_INET6" "AF_UNIX" ];
        RestrictNamespaces = true;
        LockPersonality = true;
        MemoryDenyWriteExecute = true;
        SystemCallArchitectures = "native";
        CapabilityBoundingSet = "";
      };
    };
  };
}
