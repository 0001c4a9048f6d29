# `nix flake check`: the seed's hello guest builds, and misspelled or mistyped attributes
# fail evaluation (the messages themselves are checked by mvm's tests, which see them).
{ pkgs, mkGuest }:
let
  hello = mkGuest {
    name = "hello";
    packages = [
      pkgs.python3
      pkgs.curl
    ];
    services.hello = {
      preStart = ''
        mkdir -p /tmp/www
        echo '<h1>Hello from mvm!</h1>' > /tmp/www/index.html
      '';
      command = "${pkgs.python3}/bin/python3 -m http.server 8080 --directory /tmp/www";
    };
    healthChecks.hello = {
      healthCmd = "${pkgs.curl}/bin/curl -sf http://localhost:8080/";
      healthIntervalSecs = 5;
    };
  };
  fails = guest: !(builtins.tryEval (mkGuest guest).drvPath).success;
  refused = {
    top-level-typo = fails { name = "x"; servics = { }; };
    service-typo = fails { name = "x"; services.a = { comand = "true"; }; };
    missing-command = fails { name = "x"; services.a = { }; };
    check-typo = fails { name = "x"; healthChecks.a = { healthCmd = "true"; healthIntervalSec = 5; }; };
    bad-name = fails { name = "Not_A_Name"; };
    bad-restart = fails { name = "x"; services.a = { command = "true"; restart = "sometimes"; }; };
    packages-not-a-list = fails { name = "x"; packages = pkgs.curl; };
    missing-name = fails { packages = [ ]; };
    files-relative-target = fails { name = "x"; files."app/server.py" = ./flake.nix; };
    files-dotdot-target = fails { name = "x"; files."/app/../etc/passwd" = ./flake.nix; };
    files-root-target = fails { name = "x"; files."/" = ./flake.nix; };
    files-plain-string = fails { name = "x"; files."/app/server.py" = "server.py"; };
    files-not-a-set = fails { name = "x"; files = [ ./flake.nix ]; };
  };
  failures = builtins.filter (n: !refused.${n}) (builtins.attrNames refused);
in
{
  inherit hello;
  spec-validation =
    if failures == [ ] then
      pkgs.runCommand "mvm-spec-validation" { } "echo ok > $out"
    else
      throw "mkGuest accepted invalid guests: ${builtins.concatStringsSep ", " failures}";
}
