{
  description = "mvm: mkGuest turns a guest description into a bootable microVM image";

  # Users refer to this flake as `github:<owner>/<repo>?dir=nix`; it reads the guest agent,
  # the initrd builder and the vmlinux extractor from ../src, so the image carries the agent
  # of the same commit.
  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.11";

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAll = f: builtins.listToAttrs (map (system: { name = system; value = f system; }) systems);

      agentSrc = builtins.path {
        name = "mvm-guest-agent-src";
        path = ../src/mvm/guest;
        filter = path: type: type == "regular" && builtins.match ".*\\.py" path != null;
      };
      initrdScript = builtins.path {
        name = "mvm-initrd.py";
        path = ../src/mvm/builders/initrd.py;
      };
      vmlinuxScript = builtins.path {
        name = "mvm-vmlinux.py";
        path = ../src/mvm/builders/vmlinux.py;
      };

      mkGuestFor =
        system:
        import ./mkguest.nix {
          pkgs = nixpkgs.legacyPackages.${system};
          inherit agentSrc initrdScript vmlinuxScript;
        };
    in
    {
      lib = forAll (system: {
        mkGuest = mkGuestFor system;
      });

      checks = forAll (
        system:
        import ./checks.nix {
          pkgs = nixpkgs.legacyPackages.${system};
          mkGuest = mkGuestFor system;
        }
      );
    };
}
